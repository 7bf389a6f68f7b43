"""The API's one tokenizer thread, shared fairly: clients take turns, one call each.

Tokenizing runs off the event loop (it would stall every other client) on a single thread
(a Hugging Face tokenizer must not be called from several threads at once). A plain FIFO let one
client queue many large prompts and hold that thread for everyone: two clients sending 30,000
empty messages each took a good chat from 30 ms to about 1 s. Here each client has its own
queue and the thread takes the clients in turn, one call each, so a call waits for at most one
call of each other client that has work queued; and :mod:`exo_lab.api.params` bounds what one
call may cost (characters, messages) before it is queued.

A call whose caller has gone (the client hung up, its request was cancelled) is skipped.
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import threading
from collections.abc import Callable
from typing import Any


class FairTokenizer:
    """Runs functions on one daemon thread, taking the clients with queued calls in turn."""

    def __init__(self, name: str = "exo-lab-tokenizer"):
        self.name = name
        self._queues: dict[str, collections.deque] = {}     # client -> its calls, oldest first
        self._turns: collections.deque[str] = collections.deque()   # clients with calls, next first
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None

    async def run(self, client: str, function: Callable[..., Any], *args) -> Any:
        """``function(*args)`` on the tokenizer thread, in ``client``'s turn; its result."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._wake:
            self._start()
            if client not in self._queues:
                self._queues[client] = collections.deque()
                self._turns.append(client)
            self._queues[client].append((future, function, args))
            self._wake.notify()
        # cancelling the awaiting task cancels ``future``: the thread then skips the call
        return await asyncio.wrap_future(future)

    def _start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._serve, name=self.name, daemon=True)
            self._thread.start()

    def _serve(self) -> None:
        while True:
            future, function, args = self._next_call()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(function(*args))
            except BaseException as exc:     # handed to the caller, who decides what it means
                future.set_exception(exc)

    def _next_call(self) -> tuple:
        """The oldest call of the client whose turn it is; that client goes to the back."""
        with self._wake:
            while not self._turns:
                self._wake.wait()
            client = self._turns.popleft()
            calls = self._queues[client]
            call = calls.popleft()
            if calls:
                self._turns.append(client)
            else:
                del self._queues[client]
            return call


TOKENIZER = FairTokenizer()
