"""/v1/embeddings against transformers' own final hidden states of the demo model."""
from __future__ import annotations

import base64

import numpy as np
import pytest

from fixtures_api import API_KEY, client, server  # noqa: F401 (fixtures)

TEXTS = ["The cat sat on the mat.", "Pipelines split layers over PCs."]


@pytest.fixture(scope="module")
def reference(cluster):
    """(last, mean) pooled final hidden states of TEXTS, computed by transformers itself."""
    if not hasattr(cluster, "aembed"):
        pytest.skip("Cluster.aembed (the data plane's part) is not in this tree yet")
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(cluster.pipeline.model_dir), torch_dtype=torch.float32)
    out = {"last": [], "mean": []}
    for text in TEXTS:
        ids = torch.tensor([cluster.encode(text)])
        with torch.no_grad():
            hidden = model(ids, output_hidden_states=True).hidden_states[-1][0]   # (T, hidden), after the norm
        for pooling, vector in (("last", hidden[-1]), ("mean", hidden.mean(0))):
            out[pooling].append((vector / vector.norm()).numpy())
    return out


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_vectors_equal_transformers(client, reference, pooling):
    reply = client.embeddings.create(model="demo", input=TEXTS, extra_body={"pooling": pooling})
    assert reply.usage.prompt_tokens > 0 and [d.index for d in reply.data] == [0, 1]
    for data, expected in zip(reply.data, reference[pooling]):
        assert float(np.dot(data.embedding, expected)) >= 0.9999


def test_base64_dimensions_and_token_inputs(client, cluster, reference):
    floats = client.embeddings.create(model="demo", input=TEXTS[0], encoding_format="float").data[0].embedding
    raw = client.with_raw_response.embeddings.create(model="demo", input=TEXTS[0], encoding_format="base64")
    encoded = raw.http_response.json()["data"][0]["embedding"]
    assert np.allclose(np.frombuffer(base64.b64decode(encoded), "<f4"), floats)
    ids = client.embeddings.create(model="demo", input=[cluster.encode(TEXTS[0])]).data[0].embedding
    assert np.allclose(ids, floats, atol=1e-6)
    cut = client.embeddings.create(model="demo", input=TEXTS[0], dimensions=16).data[0].embedding
    expected = np.asarray(floats[:16]) / np.linalg.norm(floats[:16])
    assert len(cut) == 16 and np.allclose(cut, expected, atol=1e-5)


def test_langchain_openai_embeddings(server, reference):
    # check_embedding_ctx_length=False: otherwise LangChain counts tokens with tiktoken, which must
    # download its files (no network here) and knows nothing of this model's tokenizer anyway.
    from langchain_openai import OpenAIEmbeddings

    embeddings = OpenAIEmbeddings(base_url=server.url + "/v1", api_key=API_KEY, model="demo",
                                  check_embedding_ctx_length=False, max_retries=0)
    vectors = embeddings.embed_documents(TEXTS)
    assert float(np.dot(vectors[1], reference["last"][1])) >= 0.9999
    assert float(np.dot(embeddings.embed_query(TEXTS[0]), reference["last"][0])) >= 0.9999
