"""Continuous batching: every request in a batch gets the tokens it gets alone.

Requests of mixed lengths join and leave mid-flight on 2 and 3 engines, for each supported
architecture; each one's greedy tokens are compared with the same request run alone. Where they
differ, the alone run's top-two logits at the first difference must be a near-tie (closer than
1e-3, from the reference transformers model): batched float sums may round differently there
and nowhere else. Also: the waiting queue and its limit, cancellation inside a batch, a bad
request next to a batch, prefix reuse, and a request preempted for another client's.
"""
from __future__ import annotations

import asyncio

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import exo_lab
from exo_lab.coordinator.tenants import Tenant
from exo_lab.errors import QueueFull, RequestError
from exo_lab.sampling import SamplingParams

NEAR_TIE = 1e-3
# (prompt length, new tokens): six requests on four KV slots, so two wait and join the batch
# mid-flight when the shorter ones leave
REQUESTS = [(5, 24), (150, 10), (40, 30), (12, 6), (90, 18), (7, 28)]


@pytest.fixture(scope="module", params=[2, 3], ids=["2-engines", "3-engines"])
def engines(request):
    with exo_lab.Cluster.local(engines=request.param, max_cores=1) as cluster:
        yield cluster


def prompts_for(vocab: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(3, vocab, (length,), generator=generator).tolist() for length, _ in REQUESTS]


def run_together(cluster, prompts, new_tokens, **sampling) -> list[list[int]]:
    async def one(prompt, count):
        tokens = []
        async for event in cluster.astream(prompt, SamplingParams(max_new_tokens=count, ignore_eos=True, **sampling)):
            tokens.extend(event.token_ids)
        return tokens

    async def all_of_them():
        return await asyncio.gather(*[one(p, n) for p, n in zip(prompts, new_tokens)])

    return cluster.run_coroutine(all_of_them())


def first_difference_is_a_near_tie(model_dir, prompt, alone, together) -> bool:
    step = next(i for i, (a, b) in enumerate(zip(alone, together)) if a != b)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    with torch.inference_mode():
        logits = model(torch.tensor([prompt + alone[:step]])).logits[0, -1]
    top2 = torch.topk(logits, 2).values
    return float(top2[0] - top2[1]) < NEAR_TIE


@pytest.mark.parametrize("architecture", ["llama", "mistral", "qwen2", "qwen3"])
def test_each_request_in_a_batch_gets_its_tokens_alone(engines, tiny_model_dir, architecture):
    count = len(engines.control.ids)
    model_dir = tiny_model_dir(architecture, num_layers=count + 1)
    engines.load(str(model_dir), min_stages=count, max_batch=4, progress=False)
    prompts = prompts_for(AutoConfig.from_pretrained(model_dir).vocab_size)
    new_tokens = [n for _, n in REQUESTS]
    alone = [engines.generate(p, max_new_tokens=n, ignore_eos=True).token_ids for p, n in zip(prompts, new_tokens)]
    engines.metrics.step_rows_max = 0
    together = run_together(engines, prompts, new_tokens)
    assert engines.metrics.step_rows_max >= 2, "the requests never shared a step"
    differ = [i for i in range(len(prompts)) if together[i] != alone[i]]
    assert all(first_difference_is_a_near_tie(model_dir, prompts[i], alone[i], together[i]) for i in differ)
    assert len(differ) <= 1, f"{len(differ)} of {len(prompts)} requests differ from their run alone"
    assert [len(t) for t in together] == new_tokens


@pytest.fixture(scope="module")
def small_batch():
    """Two KV slots, a waiting queue of at most three."""
    with exo_lab.Cluster.local(engines=2, max_cores=1) as cluster:
        cluster.load("demo", min_stages=2, max_batch=2, progress=False)
        cluster.pipeline.scheduler.max_queued = 3
        yield cluster


def demo_prompts(cluster, n):
    return [cluster.encode(f"Request number {i} asks about clusters of PCs.") for i in range(n)]


def test_requests_beyond_the_slots_wait_in_a_fifo_queue(small_batch):
    prompts = demo_prompts(small_batch, 5)
    alone = [small_batch.generate(p, max_new_tokens=12, ignore_eos=True).token_ids for p in prompts]
    together = run_together(small_batch, prompts, [12] * 5)
    assert together == alone
    assert small_batch.metrics.running == 0 and small_batch.metrics.queued == 0


def test_past_the_queue_limit_a_request_is_refused_with_queue_full(small_batch):
    prompts = demo_prompts(small_batch, 6)

    async def six():
        tasks = [asyncio.ensure_future(_drain(small_batch, p, 40)) for p in prompts[:5]]
        await asyncio.sleep(0.05)
        try:
            with pytest.raises(QueueFull, match="max_queued 3"):
                await _drain(small_batch, prompts[5], 4)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    small_batch.run_coroutine(six())
    assert small_batch.generate(prompts[0], max_new_tokens=3, ignore_eos=True).completion_tokens == 3


async def _drain(cluster, prompt, count, tenant=None):
    tokens = []
    async for event in cluster.astream(prompt, SamplingParams(max_new_tokens=count, ignore_eos=True), tenant):
        tokens.extend(event.token_ids)
    return tokens


def test_cancelling_one_request_frees_its_slot_and_changes_no_other(small_batch):
    keep, cancel = demo_prompts(small_batch, 2)
    expected = small_batch.generate(keep, max_new_tokens=30, ignore_eos=True).token_ids

    async def both():
        kept = asyncio.ensure_future(_drain(small_batch, keep, 30))
        gone = small_batch.astream(cancel, SamplingParams(max_new_tokens=30, ignore_eos=True))
        await gone.__anext__()
        await gone.__anext__()
        await gone.aclose()                       # the client left after two tokens
        running_after_cancel = small_batch.metrics.running
        return await kept, running_after_cancel

    tokens, _ = small_batch.run_coroutine(both())
    assert tokens == expected
    assert small_batch.pipeline.scheduler.active_requests == 0


def test_a_bad_request_never_disturbs_the_batch_it_would_join(small_batch):
    prompt = demo_prompts(small_batch, 1)[0]
    expected = small_batch.generate(prompt, max_new_tokens=20, ignore_eos=True).token_ids

    async def with_a_bad_neighbour():
        good = small_batch.astream(prompt, SamplingParams(max_new_tokens=20, ignore_eos=True))
        tokens = list((await good.__anext__()).token_ids)      # it is decoding: the batch is under way
        # no await yields to the loop between its first token and the refusal: it is still running
        with pytest.raises(RequestError, match="context"):
            await _drain(small_batch, prompt * 200, 5)          # longer than the context
        # text where token ids belong (read as characters, it once stopped the scheduler), and
        # an id past the vocabulary (it would fail the step it shares with the good request)
        for bad in ("Hello there", prompt + [small_batch.pipeline.scheduler.core.vocab_size]):
            with pytest.raises(RequestError, match="token ids"):
                await _drain(small_batch, bad, 5)
        running_at_refusal = small_batch.pipeline.scheduler.active_requests
        async for event in good:
            tokens.extend(event.token_ids)
        return tokens, running_at_refusal

    tokens, running_at_refusal = small_batch.run_coroutine(with_a_bad_neighbour())
    assert running_at_refusal == 1, "the good request was not in the pipeline when the bad one came"
    assert tokens == expected


def test_a_chats_next_turn_reuses_the_kv_of_the_turn_before(small_batch):
    history = small_batch.encode("A long conversation about office PCs and language models. " * 8)
    first = small_batch.generate(history, max_new_tokens=8, ignore_eos=True)
    hits, reused = small_batch.metrics.prefix_hits_total, small_batch.metrics.prefix_tokens_total
    turn = history + first.token_ids + small_batch.encode(" And then?")
    warm = small_batch.generate(turn, max_new_tokens=8, ignore_eos=True)
    assert small_batch.metrics.prefix_hits_total == hits + 1
    assert small_batch.metrics.prefix_tokens_total - reused >= len(history)
    # the same tokens as a cold run with no reusable slot: fill both slots with other prompts first
    for other in ("Zebras graze.", "Quantum dots glow."):    # no prefix in common with anything
        small_batch.generate(other, max_new_tokens=2, ignore_eos=True)
    before = small_batch.metrics.prefix_tokens_total
    cold = small_batch.generate(turn, max_new_tokens=8, ignore_eos=True)
    assert small_batch.metrics.prefix_tokens_total - before < len(history)
    assert warm.token_ids == cold.token_ids


def test_a_preempted_request_replays_and_gets_the_tokens_it_gets_alone(small_batch):
    """Client A holds both slots; client B's request takes one back (fair share), and the A
    request that gave it up replays its prompt and tokens so far when a slot frees."""
    prompts = demo_prompts(small_batch, 3)
    counts = [60, 60, 10]
    alone = [small_batch.generate(p, max_new_tokens=n, ignore_eos=True).token_ids for p, n in zip(prompts, counts)]
    preempted = small_batch.metrics.preempted_total

    async def contended():
        first = small_batch.metrics.tokens_total
        hog = [asyncio.ensure_future(_drain(small_batch, p, n, Tenant("a"))) for p, n in zip(prompts, counts[:2])]
        while small_batch.metrics.tokens_total < first + 10:        # both of A's are decoding
            await asyncio.sleep(0.005)
        other = await _drain(small_batch, prompts[2], counts[2], Tenant("b"))
        return [*(await asyncio.gather(*hog)), other]

    assert small_batch.run_coroutine(contended()) == alone
    assert small_batch.metrics.preempted_total == preempted + 1


def _engine(engine_id: int, host: str, threads: int, cores: int, kind: str = "cpu"):
    from exo_lab.control_types import Probe
    from exo_lab.coordinator.control import EngineInfo

    probe = Probe(hostname=host, device_name=host, advertise_host=None, pid=100 + engine_id,
                  memory_total_bytes=2**34, memory_free_bytes=2**33, cores=cores, torch_threads=threads,
                  gpus=(), mps=False, torch_version="2", torch_cuda=None, rss_bytes=2**28)
    return EngineInfo(engine_id=engine_id, node=f"{host}#{engine_id}", hostname=host, pid=100 + engine_id,
                      device="cpu" if kind == "cpu" else "cuda:0", kind=kind, budget_bytes=2**30,
                      bandwidth_bytes_per_s=1e10, threads=threads, local=False, device_name=host,
                      probe=probe)


def test_stages_sharing_a_pc_take_turns_only_when_they_would_oversubscribe_its_cores():
    from exo_lab.coordinator.pipeline import default_micro_batches

    # one stage per PC: every PC busy at once
    assert default_micro_batches([_engine(0, "a", 16, 16), _engine(1, "b", 16, 16), _engine(2, "c", 8, 8)]) == 3
    # two engines on one 2-core PC, one thread each: they fit side by side
    assert default_micro_batches([_engine(0, "a", 1, 2), _engine(1, "a", 1, 2)]) == 2
    # two engines with all of its 2 cores each: they take turns
    assert default_micro_batches([_engine(0, "a", 2, 2), _engine(1, "a", 2, 2)]) == 1
    # a GPU stage uses no CPU threads to speak of
    assert default_micro_batches([_engine(0, "a", 2, 2), _engine(1, "a", 2, 2, kind="cuda")]) == 2
