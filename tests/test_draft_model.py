"""The draft model of speculative decoding (exo_lab.coordinator.draft_model) on tiny random
checkpoints: its drafts are transformers' greedy tokens of the same model, also after a draft
was rejected and the request went on elsewhere (its KV slot reused, the stale positions
overwritten); it stops when unsure; a model of another vocabulary is refused by name. The
speed-up and exactness through a real pipeline are in test_real_model (SmolLM2)."""
from __future__ import annotations

import pytest
from transformers import AutoTokenizer

import exo_lab.coordinator.draft_model as draft_module
from exo_lab.coordinator.draft_model import DraftModel
from exo_lab.coordinator.schedule import DraftAsk
from exo_lab.errors import ModelError
from stages import hf_greedy, make_prompt


@pytest.fixture(scope="module")
def served(tiny_model_dir):
    return tiny_model_dir(), AutoTokenizer.from_pretrained(str(tiny_model_dir()))


def draft_model(served, model_dir=None) -> DraftModel:
    folder, tokenizer = served
    return DraftModel.load(str(model_dir or folder), dtype="float32", context_length=256, tokenizer=tokenizer,
                           served_dir=folder)


def test_drafts_are_the_models_greedy_tokens_and_survive_a_rejection(served, monkeypatch):
    monkeypatch.setattr(draft_module, "DRAFT_CONFIDENCE", 0.0)     # a random model is never sure
    folder, _ = served
    drafter = draft_model(served)
    prompt = make_prompt(folder, 12, seed=3)[0].tolist()
    (first,) = drafter.draft((DraftAsk(1, tuple(prompt), 6),))
    assert first == hf_greedy(folder, prompt, 6)
    # the pipeline accepted two drafts, then sampled another token than the third draft
    other = next(t for t in range(3, 50) if t != first[2])
    moved_on = prompt + first[:2] + [other]
    (second,) = drafter.draft((DraftAsk(1, tuple(moved_on), 5),))
    assert second == hf_greedy(folder, moved_on, 5)
    # more requests than slots: the least recently used slot is given up and refilled
    for request_id in range(2, 2 + draft_module.DRAFT_SLOTS):
        drafter.draft((DraftAsk(request_id, tuple(prompt[:5 + request_id]), 2),))
    (again,) = drafter.draft((DraftAsk(1, tuple(moved_on), 5),))
    assert again == second
    assert drafter.seconds > 0 and drafter.threads >= 1
    drafter.close()


def test_drafting_stops_when_the_draft_model_is_unsure_or_told(served, monkeypatch):
    folder, _ = served
    drafter = draft_model(served)
    prompt = tuple(make_prompt(folder, 12, seed=4)[0].tolist())
    monkeypatch.setattr(draft_module, "DRAFT_CONFIDENCE", 1.01)
    assert drafter.draft((DraftAsk(1, prompt, 6),)) == [[]]
    monkeypatch.setattr(draft_module, "DRAFT_CONFIDENCE", 0.0)
    import threading

    stop = threading.Event()
    stop.set()
    assert drafter.submit((DraftAsk(1, prompt, 6),), stop).result() == [hf_greedy(folder, list(prompt), 1)]
    drafter.close()


def test_a_draft_model_of_another_vocabulary_is_refused_by_name(served, tmp_path):
    folder, tokenizer = served
    other = tmp_path / "other-vocabulary"
    other.mkdir()
    for path in folder.iterdir():
        if path.is_file() and "token" not in path.name:
            (other / path.name).write_bytes(path.read_bytes())
    changed = AutoTokenizer.from_pretrained(str(folder))
    changed.add_tokens(["<a-token-the-served-model-lacks>"])
    changed.save_pretrained(str(other))
    with pytest.raises(ModelError, match="different vocabulary.*must share the served model's tokenizer"):
        draft_model(served, other)
    with pytest.raises(ModelError, match="the draft model.*no such folder"):
        draft_model(served, tmp_path / "no-such-model")
