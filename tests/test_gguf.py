"""GGUF files as models (exo_lab.weights.gguf): SmolLM2's own Q4_1 file loads as it is, planned
by its real bytes, and runs on exo-lab's 4-bit kernels close to its own float32 values (the
blocks dequantized: what the file means); int4 stages of a safetensors model likewise; bad files
and options get errors that name the problem."""
from __future__ import annotations

import shutil

import pytest
import torch

from exo_lab.control_types import ShardSpec
from exo_lab.errors import ConfigError, ModelError
from exo_lab.model import cpu_kernels
from exo_lab.model.profile import profile_model
from exo_lab.model.quant4 import QuantEmbedding, QuantLinear, quantize_int4
from exo_lab.planning.options import LoadOptions
from exo_lab.weights.checkpoint import load_stage
from exo_lab.weights.gguf import read_table
from exo_lab.weights.resolve import resolve_model

CORPUS_TOKENS = 160


@pytest.fixture(scope="module")
def smollm2():
    try:
        return resolve_model("smollm2")
    except ModelError as exc:           # no registry and no cached copy
        pytest.skip(str(exc))


def whole(folder, dtype, **spec):
    return load_stage(ShardSpec(str(folder), 0, 30, 30, dtype=dtype, max_context=256, max_batch=1, **spec))


def test_smollm2_loads_its_gguf_as_it_is_and_plans_by_its_real_bytes(smollm2):
    table = read_table(smollm2)
    kinds = {entry["type"] for entry in table["tensors"].values()}
    assert kinds == {"Q4_1", "Q8_0", "F32"}
    assert LoadOptions(model="smollm2").dtype == "gguf"          # dtype auto
    profile = profile_model("smollm2")
    stage = whole(smollm2, "gguf")
    layer = stage.layers[0]
    assert isinstance(layer.mlp.down_proj, QuantLinear) and layer.mlp.down_proj.layout == "q4"
    assert isinstance(stage.embed_tokens, QuantEmbedding) and stage.lm_head.layout == "q8"
    assert stage.lm_head.codes.data_ptr() == stage.embed_tokens.codes.data_ptr()   # tied, held once
    # the plan's bytes are the stage's bytes: Q4_1 matrices at 5 bits, the Q8_0 embedding at 9
    planned = profile.num_layers * profile.layer_bytes + profile.embedding_bytes + profile.final_norm_bytes
    assert stage.parameter_bytes() == planned
    assert profile.embedding_bytes == 49152 * 576 * 9 // 8
    assert planned < 0.3 * profile_model("smollm2", dtype="float32").total_parameter_bytes


def test_float32_is_the_files_blocks_dequantized(smollm2):
    """dtype float32 on the GGUF = the float32 folder built from the same file (what the
    exactness tests against transformers load)."""
    from exo_lab.weights.smollm2 import smollm2_model_dir

    from_gguf, from_folder = whole(smollm2, "float32"), whole(smollm2_model_dir(progress=False), "float32")
    ids = torch.tensor([[1, 9690, 198, 2683, 359, 253]])
    assert torch.equal(from_gguf.forward(ids, [0], [0]), from_folder.forward(ids, [0], [0]))


@pytest.mark.skipif(not cpu_kernels.available(), reason="exo-lab's CPU kernels do not run here")
def test_4bit_kernels_stay_close_to_the_files_own_values(smollm2):
    from exo_lab.bench_speed import CORPUS, perplexity_of, teacher_forced_logits
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(smollm2))
    ids = tokenizer(CORPUS.read_text(), add_special_tokens=False)["input_ids"][:CORPUS_TOKENS + 1]
    logits = [teacher_forced_logits(whole(smollm2, dtype), ids) for dtype in ("float32", "gguf")]
    reference, quantized = (torch.log_softmax(each, -1) for each in logits)
    perplexities = [perplexity_of(each, ids[1:]) for each in logits]
    kl = float((reference.exp() * (reference - quantized)).sum(-1).mean())
    agree = float((reference.argmax(-1) == quantized.argmax(-1)).float().mean())
    # activations at 8 bits per block of 32 (as llama.cpp's Q8_1): measured KL 0.004, 95% top-1
    assert kl < 0.02 and agree > 0.9, (kl, agree)
    assert abs(perplexities[1] / perplexities[0] - 1) < 0.03, perplexities


def test_int4_stages_of_a_safetensors_model_compute_with_their_int4_values(tiny_model_dir):
    """Reference: a bfloat16 stage (int4 stages compute in bfloat16) whose layer matrices hold
    what the int4 codes stand for; the int4 stage differs from it by its 8-bit activations."""
    folder = tiny_model_dir(hidden_size=128, intermediate_size=256, num_layers=2)
    ids = torch.tensor([[5, 9, 14, 3, 22, 7]])
    spec = dict(max_context=64, max_batch=1)
    stage = load_stage(ShardSpec(str(folder), 0, 2, 2, dtype="int4", **spec))
    assert all(isinstance(m, QuantLinear) for m in (stage.layers[0].self_attn.o_proj, stage.layers[1].mlp.down_proj))
    reference = load_stage(ShardSpec(str(folder), 0, 2, 2, dtype="bfloat16", **spec))
    reference.lean = None
    for layer, quantized in zip(reference.layers, stage.layers):
        for name, module in layer.named_modules():
            if hasattr(module, "weight") and module.weight.dim() == 2:
                module.weight.data = quantized.get_submodule(name).quant.dequantize(torch.bfloat16)
                assert torch.allclose(module.weight.float(), quantize_int4(module.weight.data).dequantize(), atol=0.02)
    got, exact = stage.forward(ids, [0], [0]), reference.forward(ids, [0], [0])
    assert (got - exact).abs().max() < 0.05 * exact.abs().max()
    assert profile_model(str(folder), dtype="int4").layer_bytes < 0.7 * profile_model(str(folder), dtype="int8").layer_bytes


def test_bad_gguf_files_and_options_are_named(tmp_path, smollm2):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(ModelError, match="is not a readable GGUF file.*download it again"):
        resolve_model(str(fake))
    with pytest.raises(ModelError, match="no such GGUF file"):
        resolve_model(str(tmp_path / "missing.gguf"))
    split = tmp_path / "big-00001-of-00002.gguf"
    split.write_bytes(b"GGUF")
    with pytest.raises(ModelError, match="big-00002-of-00002.gguf is not beside it"):
        resolve_model(str(split))
    with pytest.raises(ConfigError, match="dtype 'gguf' keeps a GGUF file's own formats, but 'demo'"):
        LoadOptions(model="demo", dtype="gguf")
    # a file that moved after it was loaded once: the next load names the file
    copy = tmp_path / "copy" / "smol.gguf"
    copy.parent.mkdir()
    shutil.copy(read_table(smollm2)["files"]["SmolLM2-135M-Instruct.Q4_1.gguf"]["path"], copy)
    folder = resolve_model(str(copy))
    copy.unlink()
    with pytest.raises(ModelError, match="smol.gguf"):
        whole(folder, "gguf")


@pytest.mark.skipif(not cpu_kernels.available(), reason="exo-lab's CPU kernels do not run here")
def test_one_call_decode_layers_compute_what_the_lean_layers_compute(smollm2):
    """A decode step of B rows (own slots, own positions) through exo_decode_layer (one call a
    layer) against the lean layers' torch calls on the same stage, KV slots and inputs: the same
    keys and values written, hidden states within bfloat16 rounding, the same greedy tokens."""
    stage = load_stage(ShardSpec(str(smollm2), 0, 30, 30, dtype="gguf", max_context=64, max_batch=4))
    assert stage.lean.one_call is not None and len(stage.lean.one_call) == 30
    prompts = [[1, 9690, 198, 2683, 359], [1, 504, 3458, 282, 253, 1345, 28]]
    one_call = stage.lean.one_call
    for slot, prompt in enumerate(prompts):                  # slots 0, 1 (one call) and 2, 3 (torch)
        for base in (0, 2):
            stage.forward(torch.tensor([prompt]), [slot + base], [0])
    inputs, positions = torch.tensor([[11], [42]]), [len(p) for p in prompts]
    fast = stage.forward(inputs, [0, 1], positions)
    stage.lean.one_call = None
    try:
        slow = stage.forward(inputs, [2, 3], positions)
    finally:
        stage.lean.one_call = one_call
    for layer in range(30):
        for cache in (stage.kv.keys[layer], stage.kv.values[layer]):
            for row, position in enumerate(positions):
                assert torch.equal(cache[row, :, position], cache[row + 2, :, position]) or layer > 0
    assert fast.argmax(-1).tolist() == slow.argmax(-1).tolist()
    assert (fast - slow).abs().max() < 0.1 * slow.abs().max()
    tokens = {}
    for flag in (True, False):                               # greedy continuations agree
        stage.lean.one_call = one_call if flag else None
        ids, position, slot = [int(fast[0].argmax())], positions[0] + 1, 0 if flag else 2
        for _ in range(8):
            ids.append(int(stage.forward(torch.tensor([[ids[-1]]]), [slot], [position])[0].argmax()))
            position += 1
        tokens[flag] = ids
    stage.lean.one_call = one_call
    assert tokens[True] == tokens[False]


def split_gguf(source, first, second) -> None:
    """``source`` written as two files (llama.cpp's gguf-split layout): the metadata and the first
    half of the tensors, then the rest."""
    from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter

    reader = GGUFReader(str(source))
    half = len(reader.tensors) // 2
    for index, (path, tensors) in enumerate(((first, reader.tensors[:half]), (second, reader.tensors[half:]))):
        writer = GGUFWriter(str(path), "llama")
        for name, field in reader.fields.items() if index == 0 else ():
            if not name.startswith("GGUF.") and name != "general.architecture":
                kind = field.types[0]
                writer.add_key_value(name, field.contents(), kind,
                                     sub_type=field.types[-1] if kind == GGUFValueType.ARRAY else None)
        writer.add_uint16("split.no", index)
        writer.add_uint16("split.count", 2)
        for tensor in tensors:
            quantized = tensor.tensor_type not in (GGMLQuantizationType.F32, GGMLQuantizationType.F16)
            writer.add_tensor(tensor.name, tensor.data, raw_dtype=tensor.tensor_type if quantized else None)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()


def test_a_split_q4_k_m_file_loads_as_the_whole_file(tmp_path):
    import gguf_files

    whole_file = gguf_files.write_llama_gguf(tmp_path / "tiny.Q4_K_M.gguf", recipe="Q4_K_M", vocab=1024).path
    split_gguf(whole_file, tmp_path / "tiny-00001-of-00002.gguf", tmp_path / "tiny-00002-of-00002.gguf")
    ids = torch.tensor([[1, 17, 300, 5]])
    results = []
    for model in (whole_file, tmp_path / "tiny-00001-of-00002.gguf"):
        folder = resolve_model(str(model))
        assert LoadOptions(model=str(model)).dtype == "gguf"
        stage = load_stage(ShardSpec(str(folder), 0, 4, 4, dtype="gguf", max_context=16, max_batch=1))
        results.append(stage.forward(ids, [0], [0]))
    assert torch.equal(*results)
    assert len(read_table(resolve_model(str(tmp_path / "tiny-00001-of-00002.gguf")))["files"]) == 2
