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
from typing import Protocol

from .errors import RequestError
from .settings import DRAFTERS

MAX_TEMPERATURE = 2.0
# Below this a temperature is greedy: dividing logits by 1e-38 overflows float32 to inf, and
# no sampler can tell such a distribution from argmax anyway.
GREEDY_BELOW_TEMPERATURE = 1e-4
# The one seed rule (the API, the wire and the sampler all use it): any integer torch's
# Generator.manual_seed takes, [-2**63, 2**64); a negative one stands for its two's complement
# (as torch maps it), so it is carried as the unsigned 64-bit value with the same draws.
SEED_RANGE = (-2**63, 2**64)       # half-open
MAX_SEED = 2**64 - 1               # after normalize_seed
MAX_LOGPROBS = 20                  # top alternatives a request may ask for per token
MAX_PENALTY = 2.0                  # presence_penalty and frequency_penalty lie in [-2, 2]
MAX_LOGIT_BIAS = 100.0             # a logit_bias value lies in [-100, 100]
MAX_LOGIT_BIAS_ENTRIES = 300       # OpenAI's limit on a request's logit_bias
MAX_RULE_BIAS = 4096               # bias entries a LogitRule carries (logit_bias + penalties + grammar)
MAX_ALLOWED_BYTES = 2**20          # an allowed-token bitmask: at most 8M token ids
MAX_TOKEN_ID = 2**32 - 2           # the wire's u32 token ids, NO_TOKEN excluded


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
    ``speculative`` False: never verify drafted tokens for this request (where the cluster
    speculates; the tokens are the same either way, only their pace differs); True: the load's
    drafter; a drafter's name (``"prompt_lookup"``, ``"draft_model"``): that one for this request.
    """

    max_new_tokens: int = 64
    stop: tuple[str, ...] = field(default_factory=tuple)
    ignore_eos: bool = False
    logprobs: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    speculative: bool | str = True
    adapter: int = 0            # the LoRA adapter it runs with, as the cluster numbered it (0: the base model)

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_int(self.adapter, "adapter", 0, 2**16 - 1)
        if not isinstance(self.speculative, bool) and self.speculative not in DRAFTERS:
            raise RequestError(f"speculative must be true, false or a drafter ({', '.join(map(repr, DRAFTERS))}), "
                               f"got {self.speculative!r}", param="speculative")
        if self.logprobs is not None:
            _check_int(self.logprobs, "logprobs", 0, MAX_LOGPROBS)
        _check_number(self.presence_penalty, "presence_penalty", -MAX_PENALTY, MAX_PENALTY, "between -2 and 2")
        _check_number(self.frequency_penalty, "frequency_penalty", -MAX_PENALTY, MAX_PENALTY, "between -2 and 2")
        object.__setattr__(self, "logit_bias", _bias_entries(self.logit_bias, "logit_bias", MAX_LOGIT_BIAS_ENTRIES,
                                                             MAX_LOGIT_BIAS))
        if not isinstance(self.max_new_tokens, int) or isinstance(self.max_new_tokens, bool) \
                or self.max_new_tokens < 1:
            raise RequestError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}",
                               param="max_tokens")
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        if any(not isinstance(s, str) or not s for s in stop):
            raise RequestError("stop must be a non-empty string or a list of non-empty strings",
                               param="stop")
        object.__setattr__(self, "stop", stop)

    @property
    def penalized(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty)

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


def _bias_entries(entries, name: str, max_entries: int, max_abs: float | None) -> tuple[tuple[int, float], ...]:
    """``entries`` (pairs, or a {token id: bias} dict) as sorted (token id, float bias) pairs, one per
    id; RequestError naming ``name`` for a bad id, a non-finite or out-of-range bias, or too many."""
    items = list(entries.items()) if isinstance(entries, dict) else entries
    if not isinstance(items, (list, tuple)) or len(items) > max_entries:
        raise RequestError(f"{name} must hold at most {max_entries} (token id, bias) pairs", param=name)
    merged: dict[int, float] = {}
    for item in items:
        if not isinstance(item, (list, tuple)) or len(item) != 2:
            raise RequestError(f"{name} entries must be (token id, bias) pairs, got {item!r}", param=name)
        token_id, bias = item
        _check_int(token_id, name, 0, MAX_TOKEN_ID)
        limit = math.inf if max_abs is None else max_abs
        ok = isinstance(bias, (int, float)) and not isinstance(bias, bool) and math.isfinite(bias)
        if not ok or not -limit <= bias <= limit:
            allowed = "a finite number" if max_abs is None else f"a number between {-max_abs:g} and {max_abs:g}"
            raise RequestError(f"{name} for token {token_id} must be {allowed}, got {bias!r}", param=name)
        if token_id in merged:
            raise RequestError(f"{name} names token {token_id} twice", param=name)
        merged[token_id] = float(bias)
    return tuple(sorted(merged.items()))


# ----------------------------------------------------------------------------- logit rules

@dataclass(frozen=True)
class LogitRule:
    """What the last stage applies to one row's logits before it samples, computed on the
    coordinator (so the last stage stays stateless and replay exact).

    ``allowed``: a bitmask of the tokens that may come next, or None for all: bit ``i % 32`` of
    little-endian uint32 word ``i // 32`` set means token ``i`` is allowed (llguidance's and
    xgrammar's layout); ids past the mask are not allowed. ``bias``: (token id, bias) pairs added
    to the logits first. Raises RequestError for a mask that is not whole words or over
    MAX_ALLOWED_BYTES, or a bias with a bad id, a non-finite value or over MAX_RULE_BIAS entries.
    """

    allowed: bytes | None = None
    bias: tuple[tuple[int, float], ...] = ()

    def __post_init__(self) -> None:
        if self.allowed is not None:
            if not isinstance(self.allowed, (bytes, bytearray, memoryview)):
                raise RequestError(f"LogitRule.allowed must be bytes, got {type(self.allowed).__name__}",
                                   param="allowed")
            allowed = bytes(self.allowed)
            if len(allowed) % 4 or len(allowed) > MAX_ALLOWED_BYTES:
                raise RequestError(f"LogitRule.allowed must be whole uint32 words, at most {MAX_ALLOWED_BYTES} "
                                   f"bytes, got {len(allowed)}", param="allowed")
            object.__setattr__(self, "allowed", allowed)
        object.__setattr__(self, "bias", _bias_entries(self.bias, "bias", MAX_RULE_BIAS, None))


@dataclass(frozen=True)
class TokenLogprob:
    """A sampled token's log-probability and the ``len(top)`` most likely tokens' (best first)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


class LogitProcessor(Protocol):
    """Shapes one request's tokens from the coordinator (a grammar, say). The scheduling core
    asks :meth:`next_rule` when it plans a row that samples, and calls :meth:`accept` with each
    token the request receives, in order; a request whose processor is :meth:`finished` ends
    with finish_reason "stop". It must not do I/O: it runs inside the scheduling core."""

    def next_rule(self) -> LogitRule | None:
        """The constraint on the next token (e.g. the grammar's allowed mask), or None."""

    def accept(self, token_id: int) -> None:
        """The request received ``token_id``."""

    def finished(self) -> bool:
        """True once nothing more may follow (the grammar is complete)."""


def merge_rule(rule: LogitRule | None, params: SamplingParams, generated: list[int]) -> LogitRule | None:
    """One row's rule: ``rule`` (a processor's) with ``params.logit_bias`` and the presence and
    frequency penalties of the request's own ``generated`` tokens added to its bias, as OpenAI
    computes them: ``bias[t] -= presence_penalty * (count[t] > 0) + frequency_penalty * count[t]``.
    None when nothing applies."""
    bias: dict[int, float] = dict(rule.bias) if rule is not None else {}
    for token_id, value in params.logit_bias:
        bias[token_id] = bias.get(token_id, 0.0) + value
    if params.penalized:
        counts: dict[int, int] = {}
        for token_id in generated:
            counts[token_id] = counts.get(token_id, 0) + 1
        for token_id, count in counts.items():
            penalty = params.presence_penalty + params.frequency_penalty * count
            bias[token_id] = bias.get(token_id, 0.0) - penalty
    allowed = rule.allowed if rule is not None else None
    if allowed is None and not bias:
        return None
    return LogitRule(allowed, tuple(bias.items()))


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


def apply_rule(scores, rule: LogitRule | None):
    """One row's float32 logits (vocab,) with ``rule``'s bias added, then -inf outside its
    allowed mask. Raises RequestError when the rule names a token past the vocabulary or
    allows none of it."""
    import torch

    if rule is None:
        return scores
    vocab = scores.numel()
    if rule.bias:
        ids = torch.tensor([token_id for token_id, _ in rule.bias], dtype=torch.long)
        if int(ids.max()) >= vocab:
            raise RequestError(f"a logit bias names token {int(ids.max())}, past the vocabulary of {vocab}",
                               param="logit_bias")
        scores = scores.index_add(0, ids, torch.tensor([b for _, b in rule.bias], dtype=scores.dtype))
    if rule.allowed is not None:
        allowed = allowed_mask(rule.allowed, vocab)
        if not bool(allowed.any()):
            raise RequestError("the logit rule allows no token of the vocabulary", param="allowed")
        scores = scores.masked_fill(~allowed, float("-inf"))
    return scores


def allowed_mask(allowed: bytes, vocab: int):
    """A bool tensor (vocab,) from a LogitRule bitmask (ids past the mask: False)."""
    import torch

    words = torch.frombuffer(bytearray(allowed), dtype=torch.int32) if allowed else torch.zeros(0, dtype=torch.int32)
    bits = (words[:, None] >> torch.arange(32, dtype=torch.int32)) & 1        # (words, 32)
    mask = bits.reshape(-1).bool()[:vocab]
    return torch.nn.functional.pad(mask, (0, vocab - mask.numel())) if mask.numel() < vocab else mask


def token_logprob(scores, token_id: int, top: int) -> TokenLogprob:
    """``token_id``'s log-probability under ``scores`` (vocab,), with the ``top`` most likely
    tokens' (best first, only tokens that may be drawn at all)."""
    import torch

    logprobs = torch.log_softmax(scores.float(), dim=-1)
    alternatives = ()
    if top:
        values, ids = torch.topk(logprobs, min(top, logprobs.numel()))
        alternatives = tuple((int(i), float(v)) for v, i in zip(values, ids) if math.isfinite(float(v)))
    return TokenLogprob(token_id, float(logprobs[token_id]), alternatives)


def sample_row(logits, settings: SamplingSettings, position: int, rule: LogitRule | None = None,
               logprobs: int = -1) -> tuple[int, TokenLogprob | None]:
    """One row's token (and its TokenLogprob when ``logprobs`` >= 0): ``rule`` applied to the
    logits (bias, then the allowed mask), then :func:`sample_token`. Log-probabilities are the
    log_softmax of the logits after bias and mask, before temperature, top_k and top_p."""
    scores = apply_rule(logits.detach().reshape(-1).float().cpu(), rule)
    token_id = sample_token(scores, settings, position)
    return token_id, (token_logprob(scores, token_id, logprobs) if logprobs >= 0 else None)


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
    ("stop" or "length"); ``logprobs`` (one per id) when the request asked for them."""

    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    logprobs: tuple[TokenLogprob, ...] = ()     # one per id in token_ids when params.logprobs is set


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
