"""Draft tokens for speculative decoding, pure: prompt lookup.

Prompt lookup (Saxena 2023; vLLM's ``ngram`` and transformers' ``prompt_lookup_num_tokens``):
the tokens a request will write next often already stand in its prompt or its own output --
an edited text, quoted context, code, a JSON value repeated. Find the most recent earlier place
where the last ``n`` tokens (``n`` from MAX_NGRAM down to MIN_NGRAM) occurred and propose the
tokens that followed them there. No second model, no state: it is a function of the tokens.

The search is one ``bytes.rfind`` over the tokens packed as little-endian u32 (C speed: about
2 us per 1,000 tokens here), bounded to the last :data:`WINDOW` tokens.
"""
from __future__ import annotations

from array import array
from collections.abc import Sequence

# Suffixes of 3 tokens, then 2. A single token matches almost anywhere in open chat and its
# drafts mostly fail (SmolLM2, benchmarks/bench_speculative.py: with 1-token matches open chat
# ran at 0.94-0.96x plain decoding, with 2 at 0.99-1.07x; editing rose from 1.54x to 1.87x).
MAX_NGRAM = 3
MIN_NGRAM = 2
WINDOW = 4096           # tokens searched, the newest ones


def prompt_lookup(tokens: Sequence[int], k: int, *, max_ngram: int = MAX_NGRAM, min_ngram: int = MIN_NGRAM,
                  window: int = WINDOW) -> list[int]:
    """Up to ``k`` tokens that followed the most recent earlier occurrence of the longest suffix
    of ``tokens`` (``max_ngram`` tokens down to ``min_ngram``) within the last ``window``
    tokens; [] when no suffix occurs earlier or ``k`` < 1."""
    if k < 1 or len(tokens) < min_ngram + 1:
        return []
    recent = array("I", tokens[-window:])
    haystack = recent.tobytes()
    count = len(recent)
    for n in range(min(max_ngram, count - 1), min_ngram - 1, -1):
        needle = haystack[(count - n) * 4:]
        limit = (count - 1) * 4        # an occurrence must start before the suffix itself does
        while limit >= len(needle):
            at = haystack.rfind(needle, 0, limit)
            if at < 0:
                break
            if at % 4 == 0:
                start = at // 4 + n
                return list(recent[start:start + k])
            limit = at + len(needle) - 1   # misaligned: only occurrences starting before it
    return []
