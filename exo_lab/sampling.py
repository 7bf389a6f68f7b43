"""Request-level value types shared by the scheduler, the API and the notebook layer."""
from __future__ import annotations

from dataclasses import dataclass, field

from .errors import RequestError


@dataclass(frozen=True)
class SamplingParams:
    """How to pick the next token and when to stop.

    temperature 0 means greedy; top_k 0 means no top-k cut; top_p 1.0 means no nucleus cut.
    ``stop`` holds strings: generation ends before the first occurrence of any of them.
    """

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    ignore_eos: bool = False        # keep going past end-of-sequence tokens (benchmarks, tests)

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise RequestError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}",
                               param="max_tokens")
        if not 0.0 <= float(self.temperature) <= 2.0:
            raise RequestError(f"temperature must be between 0 and 2, got {self.temperature!r}",
                               param="temperature")
        if not 0.0 < float(self.top_p) <= 1.0:
            raise RequestError(f"top_p must be in (0, 1], got {self.top_p!r}", param="top_p")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise RequestError(f"top_k must be an integer >= 0, got {self.top_k!r}", param="top_k")
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise RequestError("stop must be a non-empty string or a list of non-empty strings",
                               param="stop")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class StreamEvent:
    """One step of a streamed generation: new text (may be empty while a multi-byte character or a
    possible stop string is held back), the new token ids, and finish_reason on the last event
    ("stop" or "length")."""

    text: str
    token_ids: list[int]
    finish_reason: str | None = None


@dataclass
class GenerationResult:
    """What ``Cluster.generate`` returns."""

    text: str
    token_ids: list[int]            # the new tokens only
    finish_reason: str              # "stop" | "length"
    prompt_tokens: int
    time_to_first_token_s: float
    total_time_s: float

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens after the first, per second of decode time (prefill excluded)."""
        decode_s = self.total_time_s - self.time_to_first_token_s
        n = len(self.token_ids) - 1
        return n / decode_s if n > 0 and decode_s > 0 else 0.0
