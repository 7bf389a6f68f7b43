"""How the next token is picked, and the request-level value types around it.

One validation (:class:`SamplingSettings`) and one sampler (:func:`sample_token`) serve the
Python API, the HTTP API and the last stage. Every decode step carries its request's settings
(:class:`exo_lab.wire.Forward`), and the random draw for the token at sequence position ``p`` comes
from a generator seeded with ``(seed, p)`` alone: the last stage keeps no per-request state, the
same seed gives the same tokens, and a step replayed elsewhere draws the same number.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from .errors import RequestError

MAX_TEMPERATURE = 2.0
# Below this a temperature is greedy: dividing logits by 1e-38 overflows float32 to inf, and
# no sampler can tell such a distribution from argmax anyway.
GREEDY_BELOW_TEMPERATURE = 1e-4
# The one seed rule (the API, the wire and the sampler all use it): any integer torch's
# Generator.manual_seed takes, [-2**63, 2**64); a negative one stands for its two's complement
# (as torch maps it), so it is carried as the unsigned 64-bit value with the same draws.
SEED_RANGE = (-2**63, 2**64)       # half-open
MAX_SEED = 2**64 - 1               # after normalize_seed


def normalize_seed(seed, param: str = "seed") -> int:
    """``seed`` as the unsigned 64-bit value the sampler uses; RequestError outside SEED_RANGE."""
    low, high = SEED_RANGE
    if isinstance(seed, bool) or not isinstance(seed, int) or not low <= seed < high:
        raise RequestError(f"'{param}' must be an integer in [{low}, {high}), got {seed!r}", param=param)
    return seed % 2**64


@dataclass(frozen=True, kw_only=True)
class SamplingSettings:
    """The per-token part of a request: what the last stage needs at every step.

    temperature 0 (or below GREEDY_BELOW_TEMPERATURE) is greedy; top_k 0 means no top-k cut;
    top_p 1.0 means no nucleus cut; seed None means a fresh random seed per request.
    Raises RequestError naming the field and its allowed range.
    """

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None

    def __post_init__(self) -> None:
        _check_number(self.temperature, "temperature", 0.0, MAX_TEMPERATURE, "between 0 and 2")
        _check_number(self.top_p, "top_p", 0.0, 1.0, "in (0, 1]")
        if self.top_p <= 0.0:
            raise RequestError(f"top_p must be in (0, 1], got {self.top_p!r}", param="top_p")
        _check_int(self.top_k, "top_k", 0, 2**32 - 1)
        if self.seed is not None:
            object.__setattr__(self, "seed", normalize_seed(self.seed))

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW_TEMPERATURE


@dataclass(frozen=True, kw_only=True)
class SamplingParams(SamplingSettings):
    """How to pick the next token and when to stop.

    ``stop`` holds strings: generation ends before the first occurrence of any of them.
    ``ignore_eos`` keeps going past end-of-sequence tokens (benchmarks, tests).
    """

    max_new_tokens: int = 64
    stop: tuple[str, ...] = field(default_factory=tuple)
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.max_new_tokens, int) or isinstance(self.max_new_tokens, bool) \
                or self.max_new_tokens < 1:
            raise RequestError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}",
                               param="max_tokens")
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        if any(not isinstance(s, str) or not s for s in stop):
            raise RequestError("stop must be a non-empty string or a list of non-empty strings",
                               param="stop")
        object.__setattr__(self, "stop", stop)

    def settings(self, seed: int) -> SamplingSettings:
        """The per-token settings with ``seed`` (the request's own, or one drawn for it)."""
        return SamplingSettings(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, seed=seed)


def _check_number(value, name: str, low: float, high: float, allowed: str) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or not low <= value <= high:
        raise RequestError(f"{name} must be a number {allowed}, got {value!r}", param=name)


def _check_int(value, name: str, low: int, high: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise RequestError(f"{name} must be an integer in [{low}, {high}], got {value!r}", param=name)


# ----------------------------------------------------------------------------- the sampler

def step_seed(seed: int, position: int) -> int:
    """The generator seed for the token at sequence ``position`` of a request seeded ``seed``
    (splitmix64 of the pair: neighbouring positions get unrelated streams)."""
    z = (seed + 0x9E3779B97F4A7C15 * (position + 1)) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) & 0x7FFFFFFFFFFFFFFF


def sample_token(logits, settings: SamplingSettings, position: int) -> int:
    """Pick the token at sequence ``position`` from one position's logits ((1, vocab) or (vocab,)).

    Greedy: argmax (ties to the lowest id, as torch.argmax and HF greedy decoding). Otherwise, in
    Hugging Face's order: divide by temperature, keep the top_k best (ties at the k-th value
    kept), keep the smallest set whose probability reaches top_p (the best token always stays),
    then draw with a generator seeded by :func:`step_seed` (settings.seed, position).
    """
    import torch

    # On the CPU in float32: the same draw whatever device produced the logits.
    scores = logits.detach().reshape(-1).float().cpu()                    # (vocab,)
    if settings.greedy:
        return int(torch.argmax(scores))
    scores = filter_scores(scores / settings.temperature, settings.top_k, settings.top_p)
    generator = torch.Generator(device="cpu")
    generator.manual_seed(step_seed(settings.seed or 0, position))
    return int(torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=generator))


def filter_scores(scores, top_k: int, top_p: float):
    """Temperature-scaled scores (vocab,) with everything outside top_k / top_p set to -inf."""
    import torch

    if 0 < top_k < scores.numel():
        kth_best = torch.topk(scores, top_k).values[-1]
        scores = scores.masked_fill(scores < kth_best, float("-inf"))
    if top_p < 1.0:
        # HF TopPLogitsWarper: sort ascending, drop the low tail whose mass is <= 1 - top_p.
        sorted_scores, order = torch.sort(scores, descending=False)
        drop_sorted = sorted_scores.softmax(dim=-1).cumsum(dim=-1) <= (1 - top_p)
        drop_sorted[-1] = False                                           # keep the best token
        scores = scores.masked_fill(drop_sorted.scatter(0, order, drop_sorted), float("-inf"))
    return scores


# ----------------------------------------------------------------------------- results

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
