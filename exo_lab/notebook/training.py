"""A fine-tuning job in a notebook: a progress bar, a live loss plot and a stop button.

``FineTuneJob`` displays as a :class:`JobView`. The job's thread calls the view after every
step (ipywidgets state set from a thread reaches the frontend through the kernel's comm); the
plot is redrawn at most every ``PLOT_EVERY_S`` seconds, and once more when the job ends.
"""
from __future__ import annotations

import threading
import time

import ipywidgets as widgets

PLOT_EVERY_S = 2.0


class JobView(widgets.VBox):
    """``progress`` (IntProgress: steps done), ``label`` (loss, tokens/s, status), ``plot`` (an
    Image of the loss figure, as PNG: set from the job's thread, where an Output widget's capture
    would also take the outputs of the cell the user runs meanwhile), ``stop_button``."""

    def __init__(self, job):
        import matplotlib.pyplot  # noqa: F401  (pyplot picks the kernel's inline backend here, on the
        # kernel's own thread: first imported in the job's thread it would not show figures)

        self.job = job
        self.progress = widgets.IntProgress(value=job.step, min=0, max=job.total_steps,
                                            description="fine-tuning", layout=widgets.Layout(width="60%"))
        self.label = widgets.HTML()
        self.stop_button = widgets.Button(description="stop", button_style="warning", icon="stop")
        self.stop_button.on_click(lambda _: threading.Thread(target=job.stop, daemon=True).start())
        self.plot = widgets.Image(format="png", layout=widgets.Layout(width="600px"))
        self._plotted_at = 0.0
        super().__init__([widgets.HBox([self.progress, self.stop_button]), self.label, self.plot])
        self.update(job)
        job._listeners.append(self.update)

    def show(self) -> None:
        from IPython.display import display

        display(self)

    def update(self, job) -> None:
        self.progress.value = job.step
        last = job.history[-1] if job.history else None
        loss = f"loss {last['loss']:.4f} · lr {last['lr']:.2e} · " if last else ""
        extra = f" · resumed {job.resumes}x" if job.resumes else ""
        error = f" · <b>{job.error}</b>" if job.error else ""
        self.label.value = (f"<code>{job.name}</code>: step {job.step}/{job.total_steps} · {loss}"
                            f"{job.tokens_per_s():.0f} tokens/s · {job.status}{extra}{error}")
        if job.done:
            self.stop_button.disabled = True
        now = time.monotonic()
        if job.done or now - self._plotted_at >= PLOT_EVERY_S:
            self._plotted_at = now
            self._draw(job)

    def _draw(self, job) -> None:
        import io

        if not job.history:
            return
        png = io.BytesIO()
        job.plot().savefig(png, format="png", dpi=80, bbox_inches="tight")
        self.plot.value = png.getvalue()
