"""The dashboard widget in real JupyterLab: a notebook that starts a 2-engine cluster and shows
``cluster.widget()`` is opened in headless Chromium, run from the Run menu, and its engine rows
must be drawn by JupyterLab's widget manager (not only exist as widget state)."""
from __future__ import annotations

import pytest
from browser import ConsoleLog, browser  # noqa: F401 (fixture)
from lab_server import dashboard_notebook, run_all_cells, running_lab

pytestmark = pytest.mark.timeout(300)


def test_widget_rows_render_in_jupyterlab(browser, tmp_path):  # noqa: F811 (fixture)
    from playwright.sync_api import expect

    context = browser.new_context(viewport={"width": 1400, "height": 900})
    try:
        page = context.new_page()
        console = ConsoleLog(page)
        with running_lab(tmp_path, dashboard_notebook("demo")) as lab:
            run_all_cells(page, lab)
            widget = page.locator(".jp-OutputArea-output .widget-vbox").first
            # one row per engine: an HBox with its memory bar and "<used> RSS / <budget>"
            rows = widget.locator(".widget-hbox:has(.widget-hprogress)", has_text="RSS / ")
            expect(rows).to_have_count(2, timeout=150_000)
            expect(rows.nth(0)).to_contain_text("embeddings + layers")
            expect(rows.nth(1)).to_contain_text("layers + head")
            for row in (rows.nth(0), rows.nth(1)):
                expect(row).to_contain_text("CPU")
                expect(row).to_contain_text("RSS / ")
            expect(widget).to_contain_text("cluster local: ready, model demo, 2 engines")
            expect(page.locator(".jp-OutputArea-output", has_text="length")).to_have_count(1, timeout=60_000)
            assert page.get_by_text("Error displaying widget").count() == 0
            assert not [text for kind, text in console.errors() if "widget" in text.lower()]
    finally:
        context.close()
