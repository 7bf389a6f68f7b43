"""Make the README's images from real runs:

* docs/dashboard.png - the dashboard of a live 2-engine local cluster while it generates: the
  same status the ClusterWidget shows, rendered by exo_lab.notebook.status_html and
  screenshotted with headless Chromium (`apt-get install chromium`; the widget itself needs a
  Jupyter frontend to draw).
* docs/placement.png - plot_placement of the plan exo-lab's planner makes for a model with the
  shape of Qwen2.5-14B (bfloat16, from its config.json values) on three office PCs; the demo
  model is too small to show anything but runtime overhead.

    python docs/make_screenshots.py            # needs chromium (or chromium-browser) on PATH
"""
from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import exo_lab  # noqa: E402
from exo_lab.notebook import plot_placement, status_html  # noqa: E402
from exo_lab.notebook.widget import ClusterWidget  # noqa: E402
from exo_lab.planning.planner import NodeSpec, format_plan, plan_layers  # noqa: E402
from exo_lab.model.profile import profile_from_config  # noqa: E402

DOCS = Path(__file__).resolve().parent
logger = logging.getLogger("make_screenshots")

# Qwen2.5-14B-Instruct's config.json, the keys the profile reads.
QWEN_14B = {"model_type": "qwen2", "hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 48,
            "num_attention_heads": 40, "num_key_value_heads": 8, "vocab_size": 152064,
            "max_position_embeddings": 32768, "tie_word_embeddings": False, "attention_bias": True,
            "rms_norm_eps": 1e-6}
OFFICE = [NodeSpec("system-b (RTX 4090)", budget_bytes=22_000_000_000, bandwidth_bytes_per_s=900e9, kind="cuda"),
          NodeSpec("system-c", budget_bytes=12_000_000_000, bandwidth_bytes_per_s=60e9, kind="cpu"),
          NodeSpec("system-d", budget_bytes=12_000_000_000, bandwidth_bytes_per_s=60e9, kind="cpu")]

PAGE = """<!doctype html><html><head><meta charset="utf-8"><style>
body {{ margin: 16px; font-family: sans-serif; background: white; }}
.bar {{ display: inline-block; width: 260px; height: 12px; background: #e5e7eb; vertical-align: middle; }}
.fill {{ height: 100%; background: #2563eb; }}
</style></head><body>
<div style="font-size: 15px; margin-bottom: 8px"><b>exo-lab</b> dashboard</div>
<div style="font-size: 13px; margin-bottom: 8px">tokens/s <span class="bar"><span class="fill"
 style="display: block; width: {fill:.0f}%"></span></span> {tokens_per_s:.1f} tokens/s,
 {in_flight} request(s) in flight</div>
{table}
</body></html>"""


def placement_png(path: Path) -> None:
    profile = profile_from_config(QWEN_14B, dtype="bfloat16", model_id="Qwen2.5-14B-Instruct")
    plan = plan_layers(profile, OFFICE, max_context=8192)
    logger.info("\n%s", format_plan(plan))
    plot_placement(plan).savefig(path, dpi=110)


def dashboard_status() -> dict:
    """The status of a live cluster in the middle of a generation."""
    with exo_lab.Cluster.local(engines=2, max_cores=1) as cluster:
        cluster.load("demo", min_stages=2, progress=False)
        widget = ClusterWidget(cluster, autostart=False)
        generation = threading.Thread(target=cluster.generate, args=("Show the dashboard",),
                                      kwargs={"max_new_tokens": 600, "ignore_eos": True})
        generation.start()
        time.sleep(2.0)                  # tokens/s is measured over the last 2 s
        status = widget.refresh()
        generation.join()
        widget.close()
    return status


def dashboard_png(path: Path, status: dict) -> None:
    metrics = status["metrics"] or {}
    tokens_per_s = metrics.get("tokens_per_s", 0.0)
    page = PAGE.format(table=status_html(status), tokens_per_s=tokens_per_s,
                       in_flight=metrics.get("requests_in_flight", 0), fill=min(100.0, tokens_per_s / 2))
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        sys.exit("no chromium on PATH: apt-get install chromium (or brew install chromium)")
    with tempfile.TemporaryDirectory() as tmp:
        html = Path(tmp) / "dashboard.html"
        html.write_text(page, encoding="utf-8")
        subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                        "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
                        f"--user-data-dir={tmp}/profile", f"--screenshot={path}", "--window-size=820,200",
                        html.as_uri()], check=True, capture_output=True, timeout=120)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    placement_png(DOCS / "placement.png")
    dashboard_png(DOCS / "dashboard.png", dashboard_status())
    logger.info("wrote %s and %s", DOCS / "placement.png", DOCS / "dashboard.png")


if __name__ == "__main__":
    main()
