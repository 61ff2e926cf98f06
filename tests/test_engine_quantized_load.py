"""The engine serves what export writes: GGUF files and AWQ (AutoAWQ GEMM) checkpoints, dequantized on load."""
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


def test_engine_loads_an_awq_checkpoint_as_its_int4_weights(tiny_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from export.awq import fake_quantize, pack_linear, save_awq

    group = 32
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith("model.layers.")}
    packed = {n: pack_linear(m.weight.detach(), group) for n, m in linears.items()}
    out = tmp_path / "awq"
    out.mkdir()
    save_awq(model, packed, group, out)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (out / f).write_bytes((Path(tiny_llama_dir) / f).read_bytes())
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
