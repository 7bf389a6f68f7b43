"""POST /v1/embeddings: the loaded causal model's final hidden states, pooled and L2-normalized.

- ``input``: a string, a list of strings, a list of token ids, or a list of lists of ids; at most
  ``MAX_EMBEDDING_INPUTS`` inputs (OpenAI's 2,048), each at most the model's context and not
  empty, ``MAX_EMBEDDING_TOKENS`` tokens in all (the batch runs as prefill-only rows).
- ``pooling`` (an extension): ``"last"`` (the last token's state, as Qwen3-Embedding; the default
  for every causal LM, whose last position alone has seen the whole input) or ``"mean"``.
- ``dimensions``: keep the first that many values, then L2-renormalize (as OpenAI's
  text-embedding-3); at most the hidden size.
- ``encoding_format``: ``"float"`` or ``"base64"`` (little-endian float32 bytes, as OpenAI).
"""
from __future__ import annotations

import base64

import numpy as np

from .base import JsonBodyHandler
from .errors import bad_request
from .features import is_int, short_repr
from .params import check_fields, check_model, check_prompt_chars, off_loop, string
from .tenants import client_address, request_tenant, tenant_limits

MAX_EMBEDDING_INPUTS = 2048          # as OpenAI
MAX_EMBEDDING_TOKENS = 65536         # all inputs of one request together
POOLINGS = ("last", "mean")
DEFAULT_POOLING = "last"
EMBEDDING_FIELDS = frozenset({"model", "input", "encoding_format", "dimensions", "user", "pooling"})


class EmbeddingsHandler(JsonBodyHandler):
    """POST /v1/embeddings."""

    async def handle(self, body: dict) -> None:
        check_fields(body, EMBEDDING_FIELDS, {})
        model = check_model(body, self.cluster, self.server.model_names)
        encoding = body.get("encoding_format", "float")
        if encoding not in ("float", "base64"):
            raise bad_request("'encoding_format' must be \"float\" or \"base64\"", param="encoding_format")
        pooling = body.get("pooling", DEFAULT_POOLING)
        if pooling not in POOLINGS:
            raise bad_request("'pooling' must be \"last\" or \"mean\"", param="pooling")
        dimensions = self.dimensions(body)
        user = string(body, "user")
        inputs = await self.token_inputs(body.get("input"))
        tenant = request_tenant(self.request.remote_ip, self.server.api_key, user, None,
                                tenant_limits(self.cluster.config))
        vectors = await self.cluster.aembed(inputs, pooling=pooling, tenant=tenant)
        data = [{"object": "embedding", "index": index, "embedding": encode(finish(vector, dimensions), encoding)}
                for index, vector in enumerate(vectors)]
        tokens = sum(len(ids) for ids in inputs)
        self.write_json({"object": "list", "data": data, "model": model,
                         "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    def dimensions(self, body: dict) -> int | None:
        value = body.get("dimensions")
        if value is None:
            return None
        hidden = hidden_size(self.cluster)
        if not is_int(value) or not 1 <= value <= hidden:
            raise bad_request(f"'dimensions' must be an integer between 1 and {hidden} (this model's hidden size), "
                              f"got {short_repr(value)}", param="dimensions")
        return value

    async def token_inputs(self, value) -> list[list[int]]:
        """``input`` -> token id lists, bounded (module docstring)."""
        if isinstance(value, str) or (isinstance(value, list) and value and all(is_int(t) for t in value)):
            value = [value]
        if not isinstance(value, list) or not value:
            raise bad_request("'input' must be a string, a list of strings, a list of token ids or a list of "
                              "lists of token ids, not empty", param="input")
        if len(value) > MAX_EMBEDDING_INPUTS:
            raise bad_request(f"'input' holds {len(value)} inputs; at most {MAX_EMBEDDING_INPUTS} are allowed",
                              param="input")
        context, vocab = self.cluster.context_length, len(self.cluster.tokenizer)
        texts = [item for item in value if isinstance(item, str)]
        for text in texts:
            check_prompt_chars(len(text), self.cluster, "input")
        if sum(map(len, texts)) > MAX_EMBEDDING_TOKENS * 16:
            raise bad_request(f"'input' holds {sum(map(len, texts))} characters; at most "
                              f"{MAX_EMBEDDING_TOKENS * 16} in all", param="input")
        client = client_address(self.request.remote_ip)
        encoded = await off_loop(client, encode_texts, self.cluster.tokenizer, texts) if texts else []
        inputs, total = [], 0
        for index, item in enumerate(value):
            ids = encoded.pop(0) if isinstance(item, str) else item
            if not isinstance(ids, list) or not all(is_int(t) for t in ids):
                raise bad_request(f"'input[{index}]' must be a string or a list of token ids", param="input")
            if not ids:
                raise bad_request(f"'input[{index}]' is empty: it must hold at least one token", param="input")
            outside = next((t for t in ids if not 0 <= t < vocab), None)
            if outside is not None:
                raise bad_request(f"'input[{index}]' holds token id {outside}, outside this model's vocabulary "
                                  f"[0, {vocab}): token ids must come from the served model's own tokenizer. "
                                  "A client that tokenizes with OpenAI's tiktoken (LangChain's OpenAIEmbeddings "
                                  "does by default) must send text: OpenAIEmbeddings(check_embedding_ctx_length="
                                  "False)", param="input")
            if len(ids) > context:
                raise bad_request(f"'input[{index}]' has {len(ids)} tokens; each input takes at most this "
                                  f"model's context of {context} tokens", param="input",
                                  code="context_length_exceeded")
            total += len(ids)
            inputs.append(ids)
        if total > MAX_EMBEDDING_TOKENS:
            raise bad_request(f"'input' holds {total} tokens in all; at most {MAX_EMBEDDING_TOKENS} per request: "
                              "split it", param="input")
        return inputs


def encode_texts(tokenizer, texts: list[str]) -> list[list[int]]:
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def finish(vector, dimensions: int | None) -> np.ndarray:
    """A pooled hidden state -> float32, cut to ``dimensions``, L2-normalized."""
    values = np.asarray(vector.detach().float().cpu().numpy() if hasattr(vector, "detach") else vector,
                        dtype=np.float32).reshape(-1)
    if dimensions is not None:
        values = values[:dimensions]
    norm = float(np.linalg.norm(values))
    return values / norm if norm > 0 else values


def encode(values: np.ndarray, encoding: str):
    if encoding == "base64":
        return base64.b64encode(values.astype("<f4").tobytes()).decode("ascii")
    return values.tolist()


_HIDDEN: dict = {}       # model folder -> hidden size


def hidden_size(cluster) -> int:
    from ..weights.resolve import read_model_config

    folder = cluster.pipeline.model_dir
    if folder not in _HIDDEN:
        _HIDDEN[folder] = int(read_model_config(folder)["hidden_size"])
    return _HIDDEN[folder]
