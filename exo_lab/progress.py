"""Progress bars: the notebook widget form inside Jupyter, tqdm's text form on a terminal."""
from __future__ import annotations

import contextlib
import sys


def _in_notebook() -> bool:
    shell = sys.modules.get("IPython") and sys.modules["IPython"].get_ipython()
    return bool(shell) and type(shell).__name__ == "ZMQInteractiveShell"


@contextlib.contextmanager
def progress_bar(*, total: int, desc: str, unit: str = "it", enabled: bool = True):
    """A tqdm bar (notebook form in Jupyter); a do-nothing bar when disabled or not a terminal."""
    if not enabled or not (_in_notebook() or sys.stderr.isatty()):
        yield _NullBar()
        return
    if _in_notebook():
        from tqdm.notebook import tqdm
    else:
        from tqdm import tqdm
    with tqdm(total=total, desc=desc, unit=unit, leave=False) as bar:
        yield bar


class _NullBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, text: str) -> None:
        pass
