"""The chat page (/), the dashboard (/dashboard) and GET /v1/cluster/status, on a real 2-stage
cluster: first over plain HTTP, then in headless Chromium (tests/browser.py) as a user sees them.
"""
from __future__ import annotations

import re
import threading

import pytest
from browser import ConsoleLog, browser  # noqa: F401 (fixture)
from fixtures_api import API_KEY, call, server, wait_until  # noqa: F401 (fixture)

from exo_lab.notebook.widget import ClusterWidget

QUESTION = "Tell me the capital of France."
PHONE = {"width": 390, "height": 844}


# ------------------------------------------------------------------ over HTTP

def test_pages_are_served_with_a_strict_policy(server):
    for path in ("/", "/dashboard", "/dashboard/"):
        answer = call(server, "GET", path, key=None)
        assert answer.status == 200, path
        assert answer.headers["Content-Type"].startswith("text/html")
        assert "default-src 'self'" in answer.headers["Content-Security-Policy"]
    assert b'src="/static/chat.js"' in call(server, "GET", "/", key=None).body
    script = call(server, "GET", "/static/dashboard.js", key=None)
    assert script.status == 200 and b"/v1/cluster/status" in script.body
    assert call(server, "GET", "/static/no-such-file.js", key=None).status == 404


def test_status_needs_the_key_and_is_the_widgets_data(server, cluster):
    assert call(server, "GET", "/v1/cluster/status", key=None).status == 401
    answer = call(server, "GET", "/v1/cluster/status")
    assert answer.status == 200
    status = answer.json
    assert status["model"] == "demo" and status["state"] == "ready"
    assert [row["engine_id"] for row in status["engines"]] == sorted(cluster.control.ids)
    assert status["plan"]["stages"] == cluster.plan.to_json()["stages"]
    widget = ClusterWidget(cluster, autostart=False)
    try:
        shown = {row.engine_id: row.view for row in widget.rows}
        assert status["display"]["title"] == "cluster local: ready, model demo, 2 engines"
        for row in status["display"]["engines"]:   # the same rows as the notebook widget
            view = shown[row["engine_id"]]
            assert (row["node"], row["layers"], row["roles"], row["device"], row["speed"]) == \
                (view.node, view.layers, view.roles, view.device, view.speed)
            assert re.fullmatch(r"\d+\.\d / (\d+\.\d|-)", view.speed), view.speed   # planned / measured ms
            assert row["memory_budget_bytes"] == view.memory_budget_bytes
    finally:
        widget.close()


# ------------------------------------------------------------------ in Chromium

@pytest.fixture
def page(browser, server):  # noqa: F811 (fixture)
    """A fresh tab (its own sessionStorage) on the server; fails the test on unexpected console errors."""
    context = browser.new_context(viewport={"width": 1000, "height": 760})
    tab = context.new_page()
    tab.set_default_timeout(30_000)
    tab.console = ConsoleLog(tab)
    tab.base_url = f"http://127.0.0.1:{server.port}"
    try:
        yield tab
        assert tab.console.errors() == []
    finally:
        context.close()


def give_key(page, key: str = API_KEY) -> None:
    from playwright.sync_api import expect

    dialog = page.locator("#key-dialog")
    expect(dialog).to_be_visible()
    dialog.locator("input").fill(key)
    dialog.locator("button").click()


def open_chat(page, *, temperature="0", max_tokens="48") -> None:
    from playwright.sync_api import expect

    page.goto(page.base_url + "/")
    give_key(page)
    expect(page.locator("#model")).to_have_text("model demo")
    page.locator("#settings summary").click()
    page.locator("#temperature").fill(temperature)
    page.locator("#max-tokens").fill(max_tokens)


def ask(page, question: str) -> None:
    page.locator("#prompt").fill(question)
    page.locator("#prompt").press("Enter")


def count_reply_changes(page) -> None:
    """Count, in the page, every change to the text of the chat (read back as window.replyChanges)."""
    page.evaluate("""() => {
        window.replyChanges = 0;
        new MutationObserver(() => { window.replyChanges += 1; })
            .observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});
    }""")


def test_chat_streams_the_answer(page, cluster):
    from playwright.sync_api import expect

    open_chat(page)
    count_reply_changes(page)
    ask(page, QUESTION)
    expect(page.locator("body")).to_have_attribute("data-state", "idle")
    expect(page.locator(".message.user")).to_have_text(QUESTION)
    reply = page.locator(".message.assistant")
    expect(reply).not_to_have_class("streaming")
    expected = cluster.chat(QUESTION, max_new_tokens=48)          # greedy, as the page asked
    assert reply.text_content() == expected.text
    assert page.evaluate("window.replyChanges") > 10              # it grew token by token
    stats = page.locator("#stats").text_content()
    assert stats.startswith(f"{len(expected.token_ids)} tokens · ") and "tokens/s · first token" in stats
    assert float(stats.split(" · ")[1].split()[0]) > 0            # tokens/s


def test_a_wrong_key_is_refused_and_asked_again(page):
    from playwright.sync_api import expect

    page.goto(page.base_url + "/")
    give_key(page, "sk-wrong")
    expect(page.locator("#key-dialog .key-reason")).to_contain_text("The server refused that key")
    give_key(page)
    expect(page.locator("#model")).to_have_text("model demo")


def test_stop_ends_the_answer_and_frees_the_request(page, cluster):
    from playwright.sync_api import expect

    open_chat(page, max_tokens="1500")
    before = cluster.metrics.requests_finished.get("aborted", 0)
    ask(page, QUESTION)
    reply = page.locator(".message.assistant")
    wait_until(lambda: len(reply.text_content()) > 40, timeout_s=30)
    page.locator("#stop").click()
    expect(page.locator("body")).to_have_attribute("data-state", "idle")
    expect(reply.locator(".note")).to_have_text(" (stopped)")
    expect(page.locator("#stats")).to_contain_text("stopped")
    expect(page.locator("#send")).to_be_visible()
    freed, _ = wait_until(lambda: cluster.metrics.in_flight == 0, timeout_s=10)
    assert freed, "the server kept generating after the page stopped"
    assert cluster.metrics.requests_finished.get("aborted", 0) == before + 1
    stages_freed, _ = wait_until(lambda: all(not row.get("active_requests") for row in cluster.status()["engines"]),
                                 timeout_s=10)
    assert stages_freed, "a stage still holds the stopped request's KV cache"
    # the conversation goes on after a stop: the next answer is served to its end. (How much of
    # the stopped answer the next prompt holds depends on timing, and the random demo model may
    # then end at once: "no tokens (stop)" is a served answer too.)
    served = sum(cluster.metrics.requests_finished.get(reason, 0) for reason in ("length", "stop"))
    page.locator("#max-tokens").fill("4")
    ask(page, "And of Italy?")
    expect(page.locator(".message.assistant")).to_have_count(2)
    expect(page.locator("body")).to_have_attribute("data-state", "idle")
    expect(page.locator("#stats")).to_have_text(
        re.compile(r"^([1-4] tokens · .* · (length|stop)|no tokens \(stop\))$"))
    finished, _ = wait_until(lambda: sum(cluster.metrics.requests_finished.get(reason, 0)
                                         for reason in ("length", "stop")) == served + 1, timeout_s=10)
    assert finished, "the answer after a stop was not counted as finished"


def test_dashboard_shows_the_stages_and_updates(page, cluster):
    from playwright.sync_api import expect

    page.goto(page.base_url + "/dashboard")
    give_key(page)
    rows = page.locator("#engines tbody tr")
    expect(rows).to_have_count(2)
    for stage in cluster.plan.stages:
        row = page.locator(f"#engines tbody tr:has(td:text-is('{stage.node}'))")
        expect(row.locator("td.layers")).to_have_text(f"{stage.start_layer}-{stage.stop_layer - 1}")
        expect(row.locator("td.memory")).to_contain_text(" / ")
    expect(page.locator("#title")).to_have_text("cluster local: ready, model demo, 2 engines")
    expect(page.locator("svg.placement rect.stage")).to_have_count(2)
    polls = int(page.locator("body").get_attribute("data-polls"))
    requests_before = int(page.locator("#requests").text_content())

    generation = threading.Thread(target=cluster.generate, args=("Watch the dashboard",),
                                  kwargs={"max_new_tokens": 400, "ignore_eos": True})
    generation.start()
    try:
        expect(page.locator("#engines td.state").first).to_have_text("generating", timeout=15_000)
        wait_until(lambda: float(page.locator("#tokens-per-s").text_content()) > 0, timeout_s=15)
    finally:
        generation.join()
    expect(page.locator("#requests")).to_have_text(str(requests_before + 1), timeout=15_000)
    expect(page.locator("#engines td.state").first).to_have_text("idle", timeout=15_000)
    # it goes on polling (a fast generation may have fit within two polls)
    wait_until(lambda: int(page.locator("body").get_attribute("data-polls")) > polls + 2, timeout_s=15)


@pytest.mark.parametrize("path", ["/", "/dashboard"])
def test_pages_fit_a_phone(browser, server, path):  # noqa: F811 (fixture)
    context = browser.new_context(viewport=PHONE, is_mobile=True, has_touch=True)
    try:
        tab = context.new_page()
        console = ConsoleLog(tab)
        tab.goto(f"http://127.0.0.1:{server.port}{path}")
        give_key(tab)
        if path == "/":
            tab.locator("#prompt").fill(QUESTION)
            button = tab.locator("#send").bounding_box()
            assert button["x"] + button["width"] <= PHONE["width"]
            assert button["y"] + button["height"] <= PHONE["height"]
        else:
            tab.locator("#engines tbody tr").first.wait_for()
        assert tab.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
        assert console.errors() == []
    finally:
        context.close()
