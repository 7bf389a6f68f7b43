"""Token ids -> text deltas for streaming, incrementally, with stop strings held back."""
from __future__ import annotations


class TextAssembler:
    """Turns one request's new token ids into text deltas.

    Decoding is incremental (``tokenizers``' DecodeStream: constant work per token, and an
    incomplete UTF-8 sequence waits for its last byte). Text that could still be the start of
    a stop string is held back; ``stopped`` turns True when a stop string appears, and the text
    before it is the last delta."""

    def __init__(self, tokenizer, stop: tuple[str, ...]):
        from tokenizers.decoders import DecodeStream

        self._backend = tokenizer.backend_tokenizer
        self._stream = DecodeStream(skip_special_tokens=True)
        self.stop = stop
        self.held = ""            # decoded, not yet handed out
        self.stopped = False

    def add(self, token_id: int) -> str:
        """The text that is now safe to hand out after ``token_id``."""
        self.held += self._stream.step(self._backend, token_id) or ""
        cut = self._stop_index()
        if cut is not None:
            self.stopped = True
            return self._take(cut, keep=0)
        return self._take(len(self.held) - self._held_tail(), keep=None)

    def flush(self) -> str:
        """Everything held back (at the end of a generation that did not hit a stop)."""
        return self._take(len(self.held), keep=0)

    def _take(self, end: int, keep: int | None) -> str:
        delta = self.held[:end]
        self.held = "" if keep == 0 else self.held[end:]
        return delta

    def _stop_index(self) -> int | None:
        hits = [i for i in (self.held.find(s) for s in self.stop) if i >= 0]
        return min(hits) if hits else None

    def _held_tail(self) -> int:
        """Length of the longest suffix of the held text that is a proper prefix of a stop."""
        best = 0
        for stop in self.stop:
            for n in range(min(len(stop) - 1, len(self.held)), best, -1):
                if self.held.endswith(stop[:n]):
                    best = n
                    break
        return best
