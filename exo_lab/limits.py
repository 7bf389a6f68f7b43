"""Process-wide bounds: the open-descriptor limit, and a log that cannot grow faster than a small
bound whatever a peer sends.

- :func:`raise_descriptor_limit`: the soft RLIMIT_NOFILE up to ``min(hard, 65536)``, at start
  (server, worker, and through :func:`bound_process` the engines and the controller), so a
  flood of connections meets the per-socket caps long before the process runs out of files.
- :class:`RepeatFilter`: repeated log records are collapsed (the first few of each kind pass,
  the rest are counted and the next one that passes says how many were left out), with a total
  budget over all kinds and a cap on one record's length. :func:`bound_logging` installs one
  shared filter on the root logger's handlers and on the loggers that log per connection.
  :class:`LogOnce` applies it before a record is even made, for events a flood repeats.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

logger = logging.getLogger(__name__)

DESCRIPTOR_TARGET = 65536
LOW_DESCRIPTOR_LIMIT = 1024        # below this the sockets' caps may not fit: say how to raise it
ZMQ_HANDSHAKE_IVL_MS = 2000        # a ZeroMQ connection that has not finished its handshake by then is dropped
# loggers that write one record per connection or per event loop callback
PER_CONNECTION_LOGGERS = ("tornado.access", "tornado.application", "tornado.general", "asyncio")


# ------------------------------------------------------------------ descriptors
def raise_descriptor_limit(target: int = DESCRIPTOR_TARGET) -> tuple[int, int] | None:
    """Raise this process's soft open-file limit to ``min(hard, target)`` (never lower it).
    Returns (soft, hard) afterwards, or None where the OS has no such limit (Windows). Children
    started afterwards inherit it. Logs a warning when the limit stays below 1,024."""
    try:
        import resource
    except ImportError:       # Windows: no per-process RLIMIT_NOFILE to raise
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = target if hard == resource.RLIM_INFINITY else min(hard, target)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError) as exc:    # macOS caps it below an infinite hard limit
            logger.info("could not raise the open-file limit from %d to %d: %s", soft, wanted, exc)
    if soft != resource.RLIM_INFINITY and soft < LOW_DESCRIPTOR_LIMIT:
        logger.warning("this process may hold only %d open files and sockets (hard limit %s): "
                       "connection floods are refused sooner; raise it with `ulimit -Hn 65536` or "
                       "LimitNOFILE=65536 in a systemd unit", soft, hard)
    return soft, hard


def bound_process() -> None:
    """What a process exo-lab starts (engine, controller) does first: raise its descriptor
    limit and make every ZeroMQ socket of its default context drop connections that do not
    finish their handshake within ``ZMQ_HANDSHAKE_IVL_MS`` (libzmq's default is 30 s)."""
    raise_descriptor_limit()
    import zmq

    zmq.Context.instance().setsockopt(zmq.HANDSHAKE_IVL, ZMQ_HANDSHAKE_IVL_MS)


# ------------------------------------------------------------------ the log
class _Bucket:
    """A token bucket: ``capacity`` at once, then ``per_s`` a second."""

    def __init__(self, capacity: float, per_s: float, now: float):
        self.capacity, self.per_s = capacity, per_s
        self.tokens, self.updated = capacity, now

    def take(self, now: float) -> bool:
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.per_s)
        self.updated = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


@dataclass
class _Kind:
    bucket: _Bucket
    left_out: int = 0


class RepeatFilter(logging.Filter):
    """Lets through at most ``burst`` records of one kind (logger, level, message template,
    exception type), then one every ``every_s`` seconds; each that passes after some were left
    out ends with how many. Over all kinds at most ``total_burst``, then ``total_per_s`` a
    second. A message is cut to ``max_chars``. Thread-safe; one record is judged once, however
    many loggers and handlers carry this filter."""

    MARK = "_exo_lab_log_bounded"

    def __init__(self, *, burst: int = 5, every_s: float = 10.0, total_burst: int = 50,
                 total_per_s: float = 5.0, max_chars: int = 2000, max_kinds: int = 1000):
        super().__init__()
        self.burst, self.per_s = burst, 1.0 / every_s
        self.max_chars, self.max_kinds = max_chars, max_kinds
        self._total = _Bucket(total_burst, total_per_s, time.monotonic())
        self._kinds: dict[tuple, _Kind] = {}
        self._lock = threading.Lock()
        self.left_out = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, self.MARK, None) is not None:
            return getattr(record, self.MARK)
        passed, left_out = self.judge(_kind_of(record))
        setattr(record, self.MARK, passed)
        if passed:
            _shorten(record, self.max_chars, left_out)
        return passed

    def judge(self, key: tuple) -> tuple[bool, int]:
        """Whether a record of kind ``key`` passes now, and how many of its kind were left out
        since the last one that passed."""
        now = time.monotonic()
        with self._lock:
            kind = self._kinds.get(key)
            if kind is None:
                if len(self._kinds) >= self.max_kinds:
                    self._kinds.pop(next(iter(self._kinds)))
                kind = self._kinds[key] = _Kind(_Bucket(self.burst, self.per_s, now))
            if not (kind.bucket.take(now) and self._total.take(now)):
                kind.left_out += 1
                self.left_out += 1
                return False, 0
            left_out, kind.left_out = kind.left_out, 0
            return True, left_out


def _kind_of(record: logging.LogRecord) -> tuple:
    error = record.exc_info[0].__name__ if record.exc_info and record.exc_info[0] else None
    return record.name, record.levelno, str(record.msg)[:200], error


def _shorten(record: logging.LogRecord, max_chars: int, left_out: int) -> None:
    message = record.getMessage()
    if len(message) > max_chars:
        message = f"{message[:max_chars]}... [{len(message) - max_chars} more characters]"
    if left_out:
        message += f" [and {left_out} more like this, not logged]"
    if message is not record.msg or record.args:
        record.msg, record.args = message, None


REPEATS = RepeatFilter()


class LogOnce:
    """``logger``'s warnings for events that may come thousands of times a second (a refused
    connection): judged by :data:`REPEATS` before any record is made, so the ones left out cost
    next to nothing; those that pass end with how many were left out."""

    def __init__(self, logger: logging.Logger):
        self.logger = logger

    def warning(self, message: str, *args) -> None:
        if not self.logger.isEnabledFor(logging.WARNING):
            return
        passed, left_out = REPEATS.judge((self.logger.name, logging.WARNING, message, args))
        if passed:
            note = f" [and {left_out} more like this, not logged]" if left_out else ""
            self.logger.warning(message + note, *args, extra={RepeatFilter.MARK: True})


def bound_logging(loggers: tuple[str, ...] = PER_CONNECTION_LOGGERS) -> RepeatFilter:
    """Install the shared :class:`RepeatFilter` on every handler of the root logger (call it
    right after ``logging.basicConfig``) and on the loggers named in ``loggers``. Idempotent."""
    for handler in logging.getLogger().handlers:
        if REPEATS not in handler.filters:
            handler.addFilter(REPEATS)
    return bound_loggers(loggers)


def bound_loggers(loggers: tuple[str, ...]) -> RepeatFilter:
    """Install the shared :class:`RepeatFilter` on each logger named (its own records, wherever
    they are handled: a notebook's handlers too). Idempotent; returns the filter."""
    for name in loggers:
        named = logging.getLogger(name)
        if REPEATS not in named.filters:
            named.addFilter(REPEATS)
    return REPEATS
