"""The engine serves what export writes: GGUF files (dequantized on load) and AWQ (AutoAWQ GEMM)
checkpoints, whose projections stay int4 (engine/quant.py AWQLinear)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from engine import LLM, SamplingParams

pytestmark = pytest.mark.usefixtures("one_torch_thread")
PROMPTS = [[5, 900, 33, 1200, 7, 41, 3000, 12], [77, 1500, 8, 9, 10, 2048, 600]]
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


def greedy(model: str) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in LLM(model, dtype="fp32", num_blocks=64).generate(PROMPTS, GREEDY, use_tqdm=False)]


def test_engine_runs_an_f32_gguf_export_exactly_like_its_source(tiny_llama_dir, tmp_path):
    from safetensors.torch import load_file

    from export.gguf_export import write_gguf

    cfg = json.loads((Path(tiny_llama_dir) / "config.json").read_text())
    out = tmp_path / "tiny.gguf"
    write_gguf(out, cfg, load_file(str(Path(tiny_llama_dir) / "model.safetensors")), tiny_llama_dir, "f32")
    assert greedy(str(out)) == greedy(tiny_llama_dir)  # f32 is lossless: permutation and metadata round-trip


def write_rtn_awq_dir(base_dir: str, out: Path, group: int = 32):
    """``base_dir`` round-to-nearest packed as an AWQ checkpoint; returns (out, the fp model, its decoder linears)."""
    from transformers import AutoModelForCausalLM

    from export.awq import pack_linear, save_awq

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith("model.layers.")}
    packed = {n: pack_linear(m.weight.detach(), group) for n, m in linears.items()}
    out.mkdir()
    save_awq(model, packed, group, out)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (out / f).write_bytes((Path(base_dir) / f).read_bytes())
    return out, model, linears


def test_engine_loads_an_awq_checkpoint_as_its_int4_weights(tiny_llama_dir, tmp_path):
    from export.awq import fake_quantize

    group = 32
    out, model, linears = write_rtn_awq_dir(tiny_llama_dir, tmp_path / "awq", group)
    # reference: the same int4 grid applied in transformers, fp16-rounded like the saved non-quantized tensors
    with torch.no_grad():
        for m in linears.values():
            m.weight.copy_(fake_quantize(m.weight, group).half().float())
        for n, p in model.named_parameters():
            if not any(n.startswith(l) for l in linears):
                p.copy_(p.half().float())
    llm = LLM(str(out), dtype="fp32", num_blocks=64)
    ours = llm.score(PROMPTS)
    ids = torch.tensor(PROMPTS[0])[None]
    ref = torch.log_softmax(model(ids).logits[0, :-1].float(), -1).gather(-1, ids[0, 1:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(ours[0][1:]), ref, atol=2e-3, rtol=0)


@pytest.fixture(scope="module")
def awq_dir(tiny_model_factory, tmp_path_factory) -> Path:
    """A tiny Qwen2 (q/k/v biases: the fused bias path) packed as AWQ g32."""
    return write_rtn_awq_dir(tiny_model_factory("qwen2"), tmp_path_factory.mktemp("awq") / "qwen2-awq")[0]


def test_awq_projections_stay_packed_and_generate_like_the_dequantized_checkpoint(awq_dir, tmp_path):
    """The module-swap path: int4 buffers in the model, tokens equal to an fp dir of the same values."""
    import shutil

    from safetensors.torch import save_file

    from engine.quant import AWQLinear
    from export.awq import dequantize_awq_checkpoint

    llm = LLM(str(awq_dir), dtype="fp32", num_blocks=64)
    model = llm.engine.runner.model
    swapped = {n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, AWQLinear)}
    assert swapped == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}
    assert not any(n.endswith(("qkv_proj.weight", "down_proj.weight")) for n, _ in model.named_parameters())
    layer = model.model.layers[0].self_attn.qkv_proj
    assert layer.qweight.dtype == torch.int32 and layer.bias is not None

    # reference: the transformers-free dequantized checkpoint, loaded as plain fp weights
    fp_dir = tmp_path / "dequantized"
    fp_dir.mkdir()
    save_file({k: v.contiguous() for k, v in dequantize_awq_checkpoint(awq_dir).items()}, str(fp_dir / "model.safetensors"))
    config = json.loads((awq_dir / "config.json").read_text())
    config.pop("quantization_config")
    (fp_dir / "config.json").write_text(json.dumps(config))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(awq_dir / f, fp_dir / f)
    ours = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)]
    assert ours == greedy(str(fp_dir))
    assert len({t for out in ours for t in out}) > 3  # varied tokens: the comparison is not vacuous


def test_awq_linear_keeps_the_lora_hook_and_refuses_fp_merges(awq_dir, tmp_path):
    from engine.context import Context, set_context
    from engine.loader import load_named_tensors

    llm = LLM(str(awq_dir), dtype="fp32", num_blocks=64)
    model = llm.engine.runner.model
    proj = model.model.layers[0].mlp.down_proj
    x = torch.randn(3, proj.in_features)
    base = proj(x)
    seen = {}

    def adapter(x_in, y, ids):
        seen["ids"] = ids
        return y + 1.0

    proj.adapter = adapter
    ids = torch.tensor([0, -1, 0])
    set_context(Context(torch.zeros(3, dtype=torch.long), torch.zeros(1, 1, dtype=torch.int32), torch.ones(1, dtype=torch.int32),
                        torch.tensor([0, 3], dtype=torch.int32), 3, False, adapter_ids=ids))
    try:
        torch.testing.assert_close(proj(x), base + 1.0)
    finally:
        set_context(None)
        proj.adapter = None
    assert seen["ids"] is ids
    with pytest.raises(ValueError, match="AWQ int4"):
        load_named_tensors(model, [("model.layers.0.self_attn.q_proj.weight", torch.zeros(64, 64))], add=True)


_TRITON_LAYER_CHECK = """
import sys, torch
from engine.loader import load_named_tensors
from engine.quant import AWQLinear
from export.awq import pack_linear
torch.manual_seed(0)
layer = AWQLinear(128, 3 * 48, group=32, bias=True, output_sizes=[48, 48, 48], dtype=torch.float32)
parts = {p: pack_linear(torch.randn(48, 128) * 0.1, 32) for p in ("q", "k", "v")}
for i, tensors in enumerate(parts.values()):
    for leaf, t in tensors.items():
        layer.shard(getattr(layer, leaf), i).copy_(t)
layer.bias.normal_()
for rows in (2, 40):  # the fused split-K kernel and the dequantize + matmul path
    x = torch.randn(rows, 128)
    layer.backend = "torch"
    ref = layer(x)
    layer.backend = "triton"
    torch.testing.assert_close(layer(x), ref, atol=1e-4, rtol=1e-4)
print("ok")
"""


def test_awq_linear_triton_path_matches_the_torch_path():
    """The GPU forward (Triton kernels, run by Triton's CPU interpreter in a fresh process) on a fused
    q/k/v layer with bias, at decode and prefill row counts."""
    import os
    import subprocess
    import sys

    pytest.importorskip("triton")
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(root))
    result = subprocess.run([sys.executable, "-c", _TRITON_LAYER_CHECK], env=env, cwd=root, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("ok")
