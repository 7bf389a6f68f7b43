"""IPython magics: ``%exo`` and ``%%chat``. Load them with ``%load_ext exo_lab``.

The magics act on one :class:`exo_lab.Cluster` in the notebook's namespace: the one picked with
``%exo use NAME``, else the started cluster assigned most recently (names starting with ``_``,
IPython's output history, are skipped).
"""
from __future__ import annotations

import logging
import shlex

from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring

from ..errors import ExoLabError

logger = logging.getLogger(__name__)

NO_CLUSTER_HELP = ("start one first, e.g. `cluster = exo_lab.Cluster.local(engines=2).start()`, "
                   "or pick one with `%exo use NAME`")


@magics_class
class ExoMagics(Magics):
    """``%exo`` (status, plan, widget, px, use) and ``%%chat``."""

    def __init__(self, shell=None):
        super().__init__(shell)
        self.cluster_name: str | None = None    # set by `%exo use NAME`

    # ------------------------------------------------------------------ %exo
    @line_magic
    def exo(self, line: str = ""):
        """Inspect and drive the exo-lab cluster of this notebook.

        Usage::

          %exo status       the engines (host, device, roles, layers, memory, state) and throughput
          %exo plan         the loaded model's plan: layers and memory per node, predicted ms/token
          %exo widget       a live dashboard (returns the ClusterWidget; close() stops it)
          %exo px           enable %px / %%px on the engines that hold a stage (their
                            namespace has `exo_stage`, the live shard)
          %exo use NAME     act on the Cluster in variable NAME from now on
          %exo which        say which cluster the magics act on

          %%chat [--max-tokens N] [--temperature T] [--seed S] [--system TEXT]
          <message>         send the cell to the model and stream the answer

        By default the magics act on the started exo_lab.Cluster assigned most recently in
        the notebook.
        """
        words = shlex.split(line)
        if not words:
            print(self.exo.__doc__)
            return None
        command, rest = words[0], words[1:]
        handlers = {"status": self._status, "plan": self._plan, "widget": self._widget,
                    "px": self._px, "use": self._use, "which": self._which}
        if command not in handlers:
            raise UsageError(f"%exo: unknown subcommand {command!r}; use one of {', '.join(handlers)} "
                             f"(see %exo?)")
        try:
            return handlers[command](rest)
        except ExoLabError as exc:
            raise UsageError(str(exc)) from None

    def _status(self, rest: list[str]) -> None:
        from .formatting import format_status

        self._no_arguments("status", rest)
        print(format_status(self.cluster().status()))

    def _plan(self, rest: list[str]) -> None:
        from ..planning.planner import format_plan

        self._no_arguments("plan", rest)
        print(format_plan(self.cluster().plan))

    def _widget(self, rest: list[str]):
        self._no_arguments("widget", rest)
        cluster = self.cluster()
        if not cluster.control.started:
            raise UsageError("the cluster is stopped: call cluster.start() before opening its dashboard")
        return cluster.widget()

    def _px(self, rest: list[str]) -> None:
        from .experiments import stage_view

        self._no_arguments("px", rest)
        view = stage_view(self.cluster())
        view.block = True       # a %%px cell waits for the engines and shows their output
        view.activate()
        print(f"%px and %%px now run on engines {list(view.targets)} (the stages, in pipeline order); "
              f"each has its shard as `exo_stage`")

    def _use(self, rest: list[str]) -> None:
        from ..cluster import Cluster

        if len(rest) != 1:
            raise UsageError("usage: %exo use NAME (the variable that holds an exo_lab.Cluster)")
        name = rest[0]
        value = self.shell.user_ns.get(name)
        if not isinstance(value, Cluster):
            found = ", ".join(name for name, _ in self._clusters()) or "none"
            raise UsageError(f"%exo use {name}: there is no exo_lab.Cluster named {name!r} in the "
                             f"notebook (clusters found: {found})")
        self.cluster_name = name
        print(f"%exo and %%chat now act on `{name}`: {value!r}")

    def _which(self, rest: list[str]) -> None:
        self._no_arguments("which", rest)
        name, cluster = self._pick()
        print(f"`{name}`: {cluster!r}")

    @staticmethod
    def _no_arguments(command: str, rest: list[str]) -> None:
        if rest:
            raise UsageError(f"%exo {command} takes no arguments, got {' '.join(rest)!r}")

    # ------------------------------------------------------------------ %%chat
    @magic_arguments()
    @argument("--max-tokens", type=int, default=256, help="most tokens to generate (default 256)")
    @argument("--temperature", type=float, default=0.0, help="0 is greedy (default), up to 2")
    @argument("--seed", type=int, default=None, help="makes sampling with temperature > 0 reproducible")
    @argument("--system", type=str, default=None, help="a system message to put first")
    @cell_magic
    def chat(self, line: str, cell: str) -> None:
        """Send the cell to the model as a user message and stream the answer below it.

        Each cell is one single-turn conversation (optionally after --system). Interrupting the
        kernel stops the generation and frees its KV cache on every stage.
        """
        args = parse_argstring(self.chat, line)
        message = cell.strip()
        if not message:
            raise UsageError("%%chat sends the cell's text to the model: write a message below the %%chat line")
        system = _unquote(args.system) if args.system else None
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": message}]
        cluster = self.cluster()
        try:
            events = cluster.chat(messages, stream=True, max_new_tokens=args.max_tokens,
                                  temperature=args.temperature, seed=args.seed)
            try:
                for event in events:
                    print(event.text, end="", flush=True)
            finally:
                events.close()      # an interrupt cancels the request (and frees its caches) now
        except ExoLabError as exc:
            raise UsageError(str(exc)) from None
        print()

    # ------------------------------------------------------------------ which cluster
    def cluster(self):
        """The Cluster the magics act on (see the module docstring). Raises UsageError if none."""
        return self._pick()[1]

    def _pick(self):
        if self.cluster_name is not None:
            from ..cluster import Cluster

            value = self.shell.user_ns.get(self.cluster_name)
            if isinstance(value, Cluster):
                return self.cluster_name, value
            raise UsageError(f"`{self.cluster_name}` (picked with %exo use) no longer holds an exo_lab.Cluster; "
                             f"{NO_CLUSTER_HELP}")
        clusters = self._clusters()
        if not clusters:
            raise UsageError(f"there is no exo_lab.Cluster in this notebook: {NO_CLUSTER_HELP}")
        started = [(name, c) for name, c in clusters if c.control.started]
        name, cluster = (started or clusters)[-1]
        if len(started) > 1:
            others = ", ".join(n for n, _ in started if n != name)
            print(f"(using `{name}`; also started: {others}; pick one with %exo use NAME)")
        return name, cluster

    def _clusters(self) -> list[tuple[str, object]]:
        """(name, Cluster) in the namespace, in assignment order; IPython's `_` history skipped."""
        from ..cluster import Cluster

        return [(name, value) for name, value in list(self.shell.user_ns.items())
                if isinstance(value, Cluster) and not name.startswith("_")]


def _unquote(text: str) -> str:
    # IPython's magic argument parser keeps the quotes around --system 'Be brief.' (arg_split
    # is not POSIX-mode on every platform): drop one matching pair.
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    return text


def load_ipython_extension(ipython) -> None:
    """Register %exo and %%chat (``%load_ext exo_lab``)."""
    ipython.register_magics(ExoMagics)


def unload_ipython_extension(ipython) -> None:
    """Nothing to undo: IPython keeps registered magics until the kernel restarts."""
