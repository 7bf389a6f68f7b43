"""What a reply accumulates per choice, and log probabilities in OpenAI's two shapes.

Token text for log probabilities comes from a table of each token's bytes (:func:`token_table`,
built once per tokenizer on the tokenizer thread): byte-level BPE tokens map back to their exact
bytes, as OpenAI's ``bytes`` field means; a token that is part of a UTF-8 character shows as
U+FFFD in ``token`` while ``bytes`` keeps the truth.
"""
from __future__ import annotations

import weakref

_TABLES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()    # tokenizer -> TokenTable


class TokenTable:
    """Token id -> its bytes and its text."""

    def __init__(self, pieces: list[bytes]):
        self.pieces = pieces

    def bytes(self, token_id: int) -> bytes:
        return self.pieces[token_id] if 0 <= token_id < len(self.pieces) else b""

    def text(self, token_id: int) -> str:
        return self.bytes(token_id).decode("utf-8", errors="replace")


def token_table(tokenizer) -> TokenTable:
    """The tokenizer's TokenTable (cached); call it off the event loop."""
    table = _TABLES.get(tokenizer)
    if table is None:
        table = _TABLES[tokenizer] = TokenTable(_token_pieces(tokenizer))
    return table


def _token_pieces(tokenizer) -> list[bytes]:
    to_byte = {char: byte for byte, char in byte_level_alphabet().items()}
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    special = set(getattr(tokenizer, "all_special_tokens", ()))
    pieces = []
    for token in tokens:
        token = token or ""
        if token not in special and token and all(char in to_byte for char in token):
            pieces.append(bytes(to_byte[char] for char in token))        # byte-level BPE
        elif token.startswith("<0x") and token.endswith(">") and len(token) == 6:
            pieces.append(bytes([int(token[3:5], 16)]))                    # sentencepiece byte fallback
        else:
            pieces.append(token.replace("\u2581", " ").encode("utf-8"))
    return pieces


def byte_level_alphabet() -> dict[int, str]:
    """GPT-2's byte-level BPE alphabet: byte -> the printable character standing for it."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
                 *range(ord("\u00ae"), ord("\u00ff") + 1)]
    others = [byte for byte in range(256) if byte not in printable]
    return {**{byte: chr(byte) for byte in printable},
            **{byte: chr(256 + number) for number, byte in enumerate(others)}}


class Choice:
    """One choice's text, token count, log probabilities and finish reason, as events arrive."""

    def __init__(self, index: int, table: TokenTable | None = None):
        self.index = index
        self.texts: list[str] = []
        self.completion_tokens = 0
        self.logprobs: list = []            # TokenLogprob, one per generated token (when asked)
        self.finish_reason: str | None = None
        self.logprob_chars = 0              # characters of the tokens in ``logprobs`` (text_offset)
        self.table = table
        self.calls = None                   # a tools request's api.tools.ReplyCalls, once read

    def add(self, event) -> str:
        self.texts.append(event.text)
        self.completion_tokens += len(event.token_ids)
        entries = getattr(event, "logprobs", ()) or ()
        self.logprobs.extend(entries)
        if self.table is not None:
            self.logprob_chars += sum(len(self.table.text(entry.token_id)) for entry in entries)
        self.finish_reason = event.finish_reason or self.finish_reason
        return event.text

    @property
    def text(self) -> str:
        return "".join(self.texts)


def chat_logprobs(entries, table: TokenTable) -> dict:
    """OpenAI chat's ``logprobs``: {"content": [{token, logprob, bytes, top_logprobs: [...]}]}."""
    return {"content": [dict(_chat_entry(entry.token_id, entry.logprob, table),
                             top_logprobs=[_chat_entry(token_id, logprob, table) for token_id, logprob in entry.top])
                        for entry in entries],
            "refusal": None}


def _chat_entry(token_id: int, logprob: float, table: TokenTable) -> dict:
    return {"token": table.text(token_id), "logprob": float(logprob), "bytes": list(table.bytes(token_id))}


def completion_logprobs(entries, table: TokenTable, start_offset: int = 0) -> dict:
    """OpenAI's legacy completions ``logprobs``: tokens, token_logprobs, top_logprobs, text_offset
    (characters from the start of the completion, from ``start_offset`` on)."""
    tokens, offsets, offset = [], [], start_offset
    for entry in entries:
        text = table.text(entry.token_id)
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": [float(entry.logprob) for entry in entries],
            "top_logprobs": [{table.text(token_id): float(logprob) for token_id, logprob in entry.top}
                             for entry in entries],
            "text_offset": offsets}
