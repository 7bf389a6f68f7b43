"""Request bodies -> :class:`GenerationRequest`, one OpenAI field at a time.

Every field of OpenAI's chat and completions requests is in one of three groups:
- honoured: model (any name GET /v1/models lists), messages / prompt, max_tokens
  (max_completion_tokens for chat), temperature, top_p, top_k (an extension), speculative (an
  extension: false decodes without drafts where the load speculates, "prompt_lookup" or
  "draft_model" picks that drafter), seed, stop, stream,
  stream_options.include_usage, user (logged); n, logprobs / top_logprobs, penalties,
  logit_bias, response_format and tools (validated in :mod:`exo_lab.api.features`);
- accepted only at its default, refused otherwise (``DEFAULT_ONLY``): nothing stored, text
  modality, no audio...;
- anything else is refused with a 400 that names it, never ignored.

Defaults follow OpenAI: temperature 1, top_p 1; max_tokens is what is left of the context for
chat and 16 for completions.

Bounds, checked before any work (each refusal is a 400 that names the limit and the fix):
- the body: at most ``MAX_BODY_BYTES`` (exo_lab.api.base, 413) and nested at most
  ``MAX_JSON_DEPTH`` deep (:func:`check_json_nesting`, before it is parsed);
- at most ``MAX_MESSAGES`` messages (OpenAI's 2,048) with at most ``MAX_CONTENT_PARTS`` content
  parts in all; at most ``MAX_STOP_STRINGS`` stop strings (OpenAI's 4) of at most
  ``MAX_STOP_CHARS`` characters each;
- a prompt of at most ``MAX_CHARS_PER_CONTEXT_TOKEN`` characters per token of context (a
  longer one cannot fit, whatever the tokenizer makes of it), where each chat message also
  counts that many (its role markers take at least a token: 30,000 empty messages are not a
  short prompt); as token ids, at most the context.
Tokenizing runs on the API's tokenizer thread, never on the event loop that serves every other
client, with the clients taking turns (:mod:`exo_lab.api.tokenizing`).
"""
from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np

from ..errors import ClusterError, RequestError
from ..sampling import SamplingParams, normalize_seed
from ..settings import DRAFTERS
from . import features
from .choices import token_table
from .errors import bad_request, model_not_found, unsupported
from .features import Decoding, is_int, json_type, short_repr
from .tokenizing import TOKENIZER
from .tools import chat_messages as tool_messages
from .tools import render_chat

COMPLETIONS_DEFAULT_MAX_TOKENS = 16   # OpenAI's default for /v1/completions
MAX_STOP_STRINGS = 4                  # as OpenAI
MAX_STOP_CHARS = 256                  # per stop string: matching costs its length squared per token
MAX_CHARS_PER_CONTEXT_TOKEN = 16      # prompt characters allowed per token of context
MAX_MESSAGES = 2048                   # as OpenAI
MAX_CONTENT_PARTS = 2048              # text parts of all messages together
MAX_JSON_DEPTH = 64                   # an OpenAI body nests 5 deep; Python's parser fails near 1,000

SHARED_FIELDS = frozenset({"model", "max_tokens", "temperature", "top_p", "top_k", "speculative", "seed", "stop",
                           "stream", "stream_options", "user", "n", "presence_penalty", "frequency_penalty",
                           "logit_bias", "logprobs"})
CHAT_FIELDS = SHARED_FIELDS | {"messages", "max_completion_tokens", "top_logprobs", "response_format", "tools",
                               "tool_choice", "parallel_tool_calls"}
COMPLETION_FIELDS = SHARED_FIELDS | {"prompt"}

# field -> (the values accepted, as the error message writes them)
SHARED_DEFAULT_ONLY = {
    "service_tier": ((None, "auto", "default"), '"auto"'),
}
CHAT_DEFAULT_ONLY = {
    **SHARED_DEFAULT_ONLY,
    "modalities": ((None, ["text"]), '["text"]'),
    "store": ((None, False), "false"),
    "metadata": ((None, {}), "null"),
    **{name: ((None,), "null") for name in ("functions", "function_call", "audio", "prediction",
                                            "reasoning_effort", "web_search_options", "verbosity")},
}
COMPLETION_DEFAULT_ONLY = {
    **SHARED_DEFAULT_ONLY,
    "echo": ((None, False), "false"),
    "suffix": ((None,), "null"),
    "best_of": ((None, 1), "1"),
}
ModelNames = Callable[[], tuple[str, ...]]      # the names a request's model may take, primary first


@dataclass(frozen=True)
class GenerationRequest:
    """A validated generation request, ready for ``cluster.astream`` / ``astream_n``."""

    model: str               # the name the client sent (one the server serves); echoed in the reply
    prompt_ids: tuple[int, ...]
    params: SamplingParams
    stream: bool
    include_usage: bool      # streaming only: send a usage chunk before [DONE]
    user: str | None         # the caller's end-user id; logged with the request
    decoding: Decoding = field(default_factory=Decoding)   # n, logprobs, penalties, bias, grammar, tools
    token_table: object = None         # choices.TokenTable when logprobs are asked for


async def parse_chat_request(body: dict, cluster, model_names: ModelNames, client: str = "") -> GenerationRequest:
    """Validate a /v1/chat/completions body; ``model_names()``: the names ``model`` may take
    (ApiServer.model_names); ``client``: who asks, for the tokenizer's turns. Raises ApiError
    (or RequestError for bad messages)."""
    check_fields(body, CHAT_FIELDS, CHAT_DEFAULT_ONLY)
    model = check_model(body, cluster, model_names)
    decoding = chat_decoding(body, cluster)
    return await chat_request(body, cluster, model, body.get("messages"), decoding, client)


async def chat_request(body: dict, cluster, model: str, messages, decoding: Decoding,
                       client: str) -> GenerationRequest:
    """The request for chat ``messages`` (OpenAI's shape) under ``decoding``; ``body`` gives the
    sampling fields. Shared with /v1/responses."""
    messages = chat_messages(messages)
    chars = sum(len(m["content"]) + sum(len(c["arguments"]) + len(c["name"]) for c in m.get("tool_calls", ()))
                for m in messages) + len(json.dumps(decoding.tools)) * bool(decoding.tools)
    check_prompt_chars(chars, cluster, "messages", messages=len(messages))
    prompt_ids = await off_loop(client, render_chat, cluster.tokenizer, messages, decoding.tools)
    max_tokens = chat_max_tokens(body)
    if max_tokens is None:
        # OpenAI's default: whatever the context has left after the prompt.
        max_tokens = max(cluster.context_length - len(prompt_ids), 1)
    return await generation_request(body, cluster, model, prompt_ids, max_tokens, decoding, client)


async def parse_completion_request(body: dict, cluster, model_names: ModelNames,
                                   client: str = "") -> GenerationRequest:
    """Validate a /v1/completions body; ``model_names()``: the names ``model`` may take;
    ``client``: who asks, for the tokenizer's turns. Raises ApiError."""
    check_fields(body, COMPLETION_FIELDS, COMPLETION_DEFAULT_ONLY)
    model = check_model(body, cluster, model_names)
    decoding = Decoding(logprobs=features.completion_logprobs(body), **sampling_features(body, cluster))
    prompt_ids = await completion_prompt(body, cluster, client)
    max_tokens = integer(body, "max_tokens", minimum=1)
    return await generation_request(body, cluster, model, prompt_ids,
                                    COMPLETIONS_DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens,
                                    decoding, client)


def chat_decoding(body: dict, cluster) -> Decoding:
    """chat's n, logprobs, penalties, bias, response_format and tools, checked (not compiled yet)."""
    tools = features.tools(body.get("tools"))
    choice = features.tool_choice(body.get("tool_choice"), tools)
    fmt = features.response_format(body.get("response_format"))
    features.check_combination(fmt, tools, choice)
    return Decoding(logprobs=features.chat_logprobs(body), response_format=fmt, tools=tools, tool_choice=choice,
                    parallel_tool_calls=features.parallel_tool_calls(body), **sampling_features(body, cluster))


def sampling_features(body: dict, cluster) -> dict:
    return {"n": features.choice_count(body, max_batch(cluster)),
            "presence_penalty": features.penalty(body, "presence_penalty"),
            "frequency_penalty": features.penalty(body, "frequency_penalty"),
            "logit_bias": features.logit_bias(body, len(cluster.tokenizer))}


def max_batch(cluster) -> int:
    """How many requests the loaded model decodes together (its KV slots): the bound on ``n``."""
    return cluster.pipeline.options.max_batch


async def generation_request(body: dict, cluster, model: str, prompt_ids: list[int], max_tokens: int,
                             decoding: Decoding, client: str) -> GenerationRequest:
    stream = boolean(body, "stream", default=False)
    params = SamplingParams(
        max_new_tokens=max_tokens,
        temperature=number(body, "temperature", default=1.0),
        top_p=number(body, "top_p", default=1.0),
        top_k=integer(body, "top_k", minimum=0) or 0,
        speculative=speculative(body),
        seed=seed(body),
        stop=stop_strings(body),
        adapter=cluster.adapters.id_of(model),
        **decoding.sampling_fields())
    grammar = await off_loop(client, features.compile_grammar, decoding, cluster.tokenizer)
    table = None if decoding.logprobs is None else await off_loop(client, token_table, cluster.tokenizer)
    return GenerationRequest(model=model, prompt_ids=tuple(prompt_ids), params=params, stream=stream,
                             include_usage=include_usage(body, stream), user=string(body, "user"),
                             decoding=replace(decoding, grammar=grammar), token_table=table)


# ---------------------------------------------------------------- fields
def check_fields(body: dict, honoured: frozenset, default_only: dict) -> None:
    """Refuse, by name, every field that is unknown or set to a value this server cannot honour."""
    for name, value in body.items():
        if name in honoured:
            continue
        if name not in default_only:
            known = ", ".join(sorted(honoured | default_only.keys()))
            raise bad_request(f"unrecognized request argument '{name}'; this endpoint takes: {known}",
                              param=name, code="unknown_parameter")
        accepted, say = default_only[name]
        if not any(_same(value, default) for default in accepted):
            raise unsupported(name, say)


def _same(value, default) -> bool:
    """Equality that does not take True for 1 or 0 for False."""
    if isinstance(value, bool) or isinstance(default, bool):
        return value is default
    return value == default


def check_model(body: dict, cluster, model_names: ModelNames) -> str:
    """The ``model`` field, which must be one of ``model_names()`` (404 naming them otherwise)."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("'model' is required: a name GET /v1/models lists", param="model")
    if not cluster.loaded:
        raise ClusterError("no model is loaded; load one with cluster.load(...)")
    names = model_names()       # asked only now: the model id exists only once a model is loaded
    if model not in names:
        raise model_not_found(model, names)
    return model


def chat_messages(messages) -> list[dict]:
    if isinstance(messages, list):
        check_message_counts(messages)
    return tool_messages(messages)


def check_message_counts(messages: list) -> None:
    """At most MAX_MESSAGES messages and MAX_CONTENT_PARTS content parts, before any other work."""
    if len(messages) > MAX_MESSAGES:
        raise bad_request(f"'messages' holds {len(messages)} messages; at most {MAX_MESSAGES} are allowed: "
                          "drop or merge older turns", param="messages", code="too_many_messages")
    parts = sum(len(m["content"]) for m in messages if isinstance(m, dict) and isinstance(m.get("content"), list))
    if parts > MAX_CONTENT_PARTS:
        raise bad_request(f"the messages hold {parts} content parts; at most {MAX_CONTENT_PARTS} are allowed "
                          "in all: join the texts of a message into one string", param="messages",
                          code="too_many_content_parts")


def chat_max_tokens(body: dict) -> int | None:
    legacy = integer(body, "max_tokens", minimum=1)
    current = integer(body, "max_completion_tokens", minimum=1)
    if legacy is not None and current is not None and legacy != current:
        raise bad_request(f"max_tokens ({legacy}) and max_completion_tokens ({current}) disagree; "
                          "send only max_completion_tokens", param="max_completion_tokens")
    return current if current is not None else legacy


async def completion_prompt(body: dict, cluster, client: str = "") -> list[int]:
    """A string or a list of token ids (a batch of exactly one of those is unwrapped)."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        check_prompt_chars(len(prompt), cluster, "prompt")
        ids = await off_loop(client, cluster.encode, prompt)
    elif isinstance(prompt, list) and prompt and all(is_int(t) for t in prompt):
        if len(prompt) > cluster.context_length:
            raise bad_request(f"'prompt' holds {len(prompt)} token ids; this model's context is "
                              f"{cluster.context_length} tokens", param="prompt", code="context_length_exceeded")
        ids = _checked_token_ids(prompt, len(cluster.tokenizer))
    else:
        raise bad_request("'prompt' must be a string or a list of token ids (batches of several prompts "
                          "are not supported: send one request per prompt)", param="prompt")
    if not ids:
        raise bad_request("'prompt' is empty: it must hold at least one token", param="prompt")
    return ids


def check_prompt_chars(chars: int, cluster, param: str, messages: int = 0) -> None:
    """Refuse, before tokenizing, a prompt too long for the context whatever its tokens; each of
    ``messages`` counts MAX_CHARS_PER_CONTEXT_TOKEN characters more (its role markers)."""
    limit = MAX_CHARS_PER_CONTEXT_TOKEN * cluster.context_length
    counted = chars + MAX_CHARS_PER_CONTEXT_TOKEN * messages
    if counted > limit:
        held = (f"{chars} characters in {messages} messages, which count as {counted} (each message "
                f"counts {MAX_CHARS_PER_CONTEXT_TOKEN} more)" if messages else f"{chars} characters")
        raise bad_request(f"the prompt has {held}; this model's context of {cluster.context_length} tokens "
                          f"takes at most {limit} ({MAX_CHARS_PER_CONTEXT_TOKEN} per token): shorten it",
                          param=param, code="context_length_exceeded")


def check_json_nesting(raw: bytes, limit: int = MAX_JSON_DEPTH) -> None:
    """Refuse, before parsing, a body whose arrays and objects nest more than ``limit`` deep:
    Python's parser recurses and fails near 1,000 levels."""
    if raw.count(b"[") + raw.count(b"{") <= limit:
        return
    depth = json_depth(raw)
    if depth > limit:
        raise bad_request(f"the request body nests arrays and objects {depth} levels deep; at most {limit} "
                          "are allowed (an OpenAI request needs 5): flatten it", code="invalid_json")


def json_depth(raw: bytes) -> int:
    """How deep the arrays and objects of a JSON text nest, brackets inside strings left out;
    linear, without recursion and without a Python object per character (about 10 ms a mebibyte).
    Escaped backslashes, then escaped quotes, are dropped first, so each quote left opens or
    closes a string."""
    plain = np.frombuffer(raw.replace(b"\\\\", b"").replace(b'\\"', b""), dtype=np.uint8)
    outside = (np.cumsum(plain == ord('"'), dtype=np.int32) & 1) == 0
    steps = _BRACKET_STEPS[plain] * outside
    return int(np.cumsum(steps, dtype=np.int32).max(initial=0))


def may_hold_surrogates(raw: bytes) -> bool:
    """Whether a UTF-8 JSON text may hold a lone surrogate ("\\ud800"): only a \\u escape can
    put one in. False spares the parsed body a costly check."""
    return _SURROGATE_ESCAPE.search(raw) is not None


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _bracket_steps() -> np.ndarray:
    steps = np.zeros(256, dtype=np.int8)       # byte -> +1 opens, -1 closes, 0 anything else
    steps[[ord("["), ord("{")]] = 1
    steps[[ord("]"), ord("}")]] = -1
    return steps


_BRACKET_STEPS = _bracket_steps()


async def off_loop(client: str, function, *args):
    """``function(*args)`` on the API's tokenizer thread, in ``client``'s turn
    (:mod:`exo_lab.api.tokenizing`); the caps above bound each call."""
    return await TOKENIZER.run(client, function, *args)


def _checked_token_ids(ids: list[int], vocab_size: int) -> list[int]:
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise bad_request(f"'prompt' holds token id {bad[0]}, outside this model's vocabulary "
                          f"[0, {vocab_size})", param="prompt")
    return list(ids)


def stop_strings(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise bad_request("'stop' must be a non-empty string or a list of non-empty strings", param="stop")
    if len(stop) > MAX_STOP_STRINGS:
        raise bad_request(f"'stop' holds {len(stop)} strings; at most {MAX_STOP_STRINGS} are allowed",
                          param="stop")
    longest = max(len(s) for s in stop)
    if longest > MAX_STOP_CHARS:
        raise bad_request(f"a stop string has {longest} characters; each may have at most {MAX_STOP_CHARS}",
                          param="stop")
    return tuple(stop)


def include_usage(body: dict, stream: bool) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if not stream:
        raise bad_request("'stream_options' is only allowed when 'stream' is true", param="stream_options")
    if not isinstance(options, dict):
        raise bad_request("'stream_options' must be an object like {\"include_usage\": true}",
                          param="stream_options")
    for name in options:
        if name != "include_usage":
            raise unsupported(f"stream_options.{name}", "nothing (only include_usage is supported)")
    return boolean(options, "include_usage", default=False, prefix="stream_options.")


def seed(body: dict) -> int | None:
    """The seed (the one rule: :func:`exo_lab.sampling.normalize_seed`)."""
    value = integer(body, "seed")
    if value is None:
        return None
    try:
        return normalize_seed(value)
    except RequestError as exc:
        raise bad_request(str(exc), param="seed") from None


def speculative(body: dict) -> bool | str:
    """``speculative`` (an extension): true (the load's drafter), false, or a drafter's name."""
    value = body.get("speculative")
    if value is None:
        return True
    if not isinstance(value, bool) and value not in DRAFTERS:
        raise bad_request(f"'speculative' must be true, false or one of {', '.join(map(repr, DRAFTERS))}, got "
                          f"{json_type(value)} {short_repr(value)}", param="speculative")
    return value


# ---------------------------------------------------------------- JSON types
def integer(body: dict, name: str, *, minimum: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if not is_int(value):
        raise bad_request(f"'{name}' must be an integer, got {json_type(value)} {short_repr(value)}", param=name)
    if minimum is not None and value < minimum:
        raise bad_request(f"'{name}' must be >= {minimum}, got {value}", param=name)
    return value


def number(body: dict, name: str, *, default: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise bad_request(f"'{name}' must be a number, got {json_type(value)} {short_repr(value)}", param=name)
    return float(value)


def boolean(body: dict, name: str, *, default: bool, prefix: str = "") -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad_request(f"'{prefix}{name}' must be true or false, got {json_type(value)} {short_repr(value)}",
                          param=prefix + name)
    return value


def string(body: dict, name: str) -> str | None:
    value = body.get(name)
    if value is not None and not isinstance(value, str):
        raise bad_request(f"'{name}' must be a string, got {json_type(value)} {short_repr(value)}", param=name)
    return value
