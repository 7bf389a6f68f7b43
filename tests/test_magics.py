"""%exo and %%chat in a real IPython shell, acting on a real 2-engine cluster."""
from __future__ import annotations

import io
import sys

import pytest
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell
from IPython.testing.globalipapp import start_ipython
from IPython.utils.capture import capture_output

import exo_lab
from exo_lab.notebook.magics import ExoMagics
from exo_lab.notebook.widget import ClusterWidget

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def ip():
    """The test IPython shell with the extension loaded, and no cluster variables left over."""
    shell = start_ipython() or InteractiveShell.instance()   # IPython's test shell, made once per process
    shell.run_line_magic("load_ext", "exo_lab")
    magics = shell.magics_manager.registry["ExoMagics"]
    magics.cluster_name = None
    before = set(shell.user_ns)
    yield shell
    for name in set(shell.user_ns) - before:
        del shell.user_ns[name]
    magics.cluster_name = None


def run_line(ip, line: str) -> str:
    with capture_output() as captured:
        result = ip.run_line_magic("exo", line)
    assert result is None
    return captured.stdout


def test_load_ext_registers_the_magics(ip):
    assert ip.find_line_magic("exo") is not None
    assert ip.find_cell_magic("chat") is not None
    assert isinstance(ip.magics_manager.registry["ExoMagics"], ExoMagics)
    doc = ip.find_line_magic("exo").__doc__           # what %exo? shows
    for usage in ("%exo status", "%exo plan", "%exo widget", "%exo px", "%exo use NAME", "%%chat [--max-tokens N]"):
        assert usage in doc
    assert "%exo status" in run_line(ip, "")           # bare %exo prints the same help


def test_no_cluster_says_how_to_start_one(ip):
    with pytest.raises(UsageError, match=r"no exo_lab.Cluster in this notebook: start one first, e.g. "
                                         r"`cluster = exo_lab.Cluster.local\(engines=2\).start\(\)`"):
        ip.run_line_magic("exo", "status")
    with pytest.raises(UsageError, match="no exo_lab.Cluster"):
        ip.run_cell_magic("chat", "", "hello")


def test_status_and_plan(ip, cluster):
    ip.user_ns["cluster"] = cluster
    lines = run_line(ip, "status").splitlines()
    assert lines[0] == "cluster local: ready, model demo, 2 engines"
    for stage in cluster.plan.stages:
        row = next(line for line in lines if f" {stage.node} " in line)
        assert f" {stage.start_layer}-{stage.stop_layer - 1} " in row and row.endswith("idle")
    plan_text = run_line(ip, "plan")
    assert plan_text.startswith("Plan for demo (float32), objective latency")
    assert all(stage.node in plan_text for stage in cluster.plan.stages)


def test_chat_streams_the_models_answer(ip, cluster):
    ip.user_ns["cluster"] = cluster
    expected = cluster.chat("Hello, cluster!", max_new_tokens=12).text
    writes = []

    class Recorder(io.StringIO):
        def write(self, text):
            writes.append(text)
            return super().write(text)

    recorder, stdout = Recorder(), sys.stdout
    sys.stdout = recorder
    try:
        ip.run_cell_magic("chat", "--max-tokens 12", "Hello, cluster!\n")
    finally:
        sys.stdout = stdout
    assert recorder.getvalue() == expected + "\n"
    pieces = [w for w in writes if w]
    assert len(pieces) >= 6, f"the answer came in {len(pieces)} writes, not streamed: {pieces}"


def test_chat_options(ip, cluster):
    ip.user_ns["cluster"] = cluster
    with capture_output() as first:
        ip.run_cell_magic("chat", "--max-tokens 10 --temperature 0.9 --seed 3 --system 'Be brief.'", "Hi")
    with capture_output() as second:
        ip.run_cell_magic("chat", '--max-tokens 10 --temperature 0.9 --seed 3 --system "Be brief."', "Hi")
    expected = cluster.chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
                            max_new_tokens=10, temperature=0.9, seed=3).text
    assert first.stdout == second.stdout == expected + "\n"
    with pytest.raises(UsageError, match="write a message below the %%chat line"):
        ip.run_cell_magic("chat", "", "   \n")
    with pytest.raises(UsageError, match="temperature must be a number between 0 and 2"):
        ip.run_cell_magic("chat", "--temperature 5", "Hi")


def test_use_picks_the_cluster_and_names_the_problem(ip, cluster):
    fresh = exo_lab.Cluster.local(engines=1)           # never started: no processes
    ip.user_ns["cluster"] = cluster
    ip.user_ns["fresh"] = fresh
    # the default is the started cluster, though `fresh` was assigned later
    assert run_line(ip, "which").strip() == f"`cluster`: {cluster!r}"
    assert run_line(ip, "use fresh").startswith("%exo and %%chat now act on `fresh`")
    assert run_line(ip, "status").splitlines()[0] == "cluster local: stopped, 0 engines"
    with pytest.raises(UsageError, match=r"no model is loaded: call cluster.load\('demo'\)"):
        ip.run_cell_magic("chat", "", "Hi")
    with pytest.raises(UsageError, match="the cluster is stopped: call cluster.start()"):
        ip.run_line_magic("exo", "widget")
    with pytest.raises(UsageError, match=r"no exo_lab.Cluster named 'nothing' in the notebook \(clusters "
                                         r"found: cluster, fresh\)"):
        ip.run_line_magic("exo", "use nothing")
    del ip.user_ns["fresh"]
    with pytest.raises(UsageError, match="`fresh` \\(picked with %exo use\\) no longer holds an exo_lab.Cluster"):
        ip.run_line_magic("exo", "status")


def test_bad_subcommands(ip, cluster):
    ip.user_ns["cluster"] = cluster
    with pytest.raises(UsageError, match="unknown subcommand 'stats'; use one of status, plan, widget, px"):
        ip.run_line_magic("exo", "stats")
    with pytest.raises(UsageError, match="%exo status takes no arguments"):
        ip.run_line_magic("exo", "status now")


def test_widget_and_px(ip, cluster):
    ip.user_ns["cluster"] = cluster
    widget = ip.run_line_magic("exo", "widget")
    try:
        assert isinstance(widget, ClusterWidget) and widget.running
        assert len(widget.rows) == 2
    finally:
        widget.close()
    assert not widget.running
    output = run_line(ip, "px")
    assert "now run on engines [0, 1]" in output
    with capture_output() as captured:
        ip.run_cell_magic("px", "", "spec = exo_stage.stage.spec\nprint('layers', spec.start_layer, spec.stop_layer)")
    for stage in cluster.plan.stages:
        assert f"layers {stage.start_layer} {stage.stop_layer}" in captured.stdout
