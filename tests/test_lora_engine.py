"""Unmerged multi-LoRA in the engine: a batch mixing the base model and two PEFT adapters gives the
same greedy tokens as PEFT in transformers and as each adapter run alone (fp32, CPU); the adapter
is part of the prefix-cache key; unservable adapters are refused with a clear message."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.llm_engine import LLMEngine
from engine.lora import LoRAError, lora_delta_grouped
from engine.sampling_params import SamplingParams

NUM_TOKENS = 12


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # two shared cores: more threads only add contention
    yield
    torch.set_num_threads(previous)


def make_adapter(base_dir: str, out: Path, seed: int, rank: int, targets: list[str], **config) -> str:
    """A random PEFT LoRA adapter whose B is non-zero, so it really changes the model's outputs."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, **config))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.15)
    peft_model.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def adapters(tiny_llama_dir, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("adapters")
    return {
        "all": make_adapter(tiny_llama_dir, root / "all", seed=1, rank=8,
                            targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
        "some": make_adapter(tiny_llama_dir, root / "some", seed=2, rank=4, targets=["q_proj", "v_proj", "down_proj"],
                             use_rslora=True),
    }


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 49152) for _ in range(rng.randint(4, 30))] for _ in range(n)]


def hf_greedy(base_dir: str, adapter_dir: str | None, ids_list: list[list[int]]) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    if adapter_dir:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_dir)
    outs = []
    with torch.no_grad():
        for ids in ids_list:
            x = torch.tensor([ids])
            y = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=NUM_TOKENS, do_sample=False,
                               min_new_tokens=NUM_TOKENS, pad_token_id=0)
            outs.append(y[0, len(ids):].tolist())
    return outs


def lora_engine(base_dir: str, **options) -> LLMEngine:
    return LLMEngine(base_dir, dtype="fp32", device="cpu", enable_lora=True, max_loras=2, max_lora_rank=8,
                     num_blocks=128, **options)


def run(engine: LLMEngine, jobs: list[tuple[list[int], int]]) -> list[list[int]]:
    """Greedy-generate every (prompt, adapter id) job in one continuous batch."""
    params = SamplingParams(temperature=0.0, max_tokens=NUM_TOKENS, ignore_eos=True)
    ids = [engine.add_request(p, params, adapter_id=a) for p, a in jobs]
    done = {}
    while engine.has_unfinished():
        for rid in engine.step():
            out = engine.output(rid)
            if out.finished:
                done[rid] = out.outputs[0].token_ids
    return [done[i] for i in ids]


def test_mixed_adapter_batch_matches_peft_and_single_adapter_runs(tiny_llama_dir, adapters):
    engine = lora_engine(tiny_llama_dir)
    ids = {name: engine.runner.lora.load(name, path).adapter_id for name, path in adapters.items()}
    batch = prompts(4)
    jobs = [(p, a) for p in batch for a in (0, ids["all"], ids["some"])]  # interleaved: every step mixes adapters
    mixed = run(engine, jobs)
    by_adapter = {a: [m for (p, aa), m in zip(jobs, mixed) if aa == a] for a in (0, *ids.values())}
    assert by_adapter[ids["all"]] != by_adapter[0] and by_adapter[ids["some"]] != by_adapter[0], "adapters had no effect"
    assert by_adapter[0] == hf_greedy(tiny_llama_dir, None, batch)
    for name, path in adapters.items():
        expected = hf_greedy(tiny_llama_dir, path, batch)
        assert by_adapter[ids[name]] == expected, f"adapter {name} differs from PEFT"
        assert run(engine, [(p, ids[name]) for p in batch]) == expected, f"adapter {name} alone differs"
    assert engine.scheduler.block_manager.num_free_blocks == engine.runner.num_blocks


def test_adapter_is_part_of_the_prefix_cache_key(tiny_llama_dir, adapters):
    engine = lora_engine(tiny_llama_dir, block_size=4)
    a = engine.runner.lora.load("all", adapters["all"]).adapter_id
    b = engine.runner.lora.load("some", adapters["some"]).adapter_id
    prompt = prompts(1, seed=7)[0][:20] + [5] * 10
    bm = engine.scheduler.block_manager
    first = run(engine, [(prompt, a)])
    hits = bm.prefix_hits
    other = run(engine, [(prompt, b)])
    assert bm.prefix_hits == hits, "a different adapter reused KV computed under another adapter"
    assert run(engine, [(prompt, a)]) == first and bm.prefix_hits > hits, "the same adapter should hit its cached prefix"
    assert other == hf_greedy(tiny_llama_dir, adapters["some"], [prompt])


def test_unload_reload_and_refusals(tiny_llama_dir, adapters, tmp_path):
    engine = lora_engine(tiny_llama_dir)
    lora = engine.runner.lora
    first = lora.load("all", adapters["all"])
    lora.load("some", adapters["some"])
    with pytest.raises(LoRAError, match="max_loras=2"):
        lora.load("third", adapters["all"])
    with pytest.raises(LoRAError, match="already loaded"):
        lora.load("all", adapters["all"])
    lora.unload("all")
    again = lora.load("all", adapters["all"])
    assert again.slot == first.slot and again.adapter_id != first.adapter_id  # ids never reused: no stale prefix hits

    small = LLMEngine(tiny_llama_dir, dtype="fp32", device="cpu", enable_lora=True, max_loras=1, max_lora_rank=4, num_blocks=16)
    with pytest.raises(LoRAError, match="rank 8 > engine.max_lora_rank=4"):
        small.runner.lora.load("all", adapters["all"])
    dora = tmp_path / "dora"
    dora.mkdir()
    config = json.loads((Path(adapters["some"]) / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps(dict(config, use_dora=True)))
    with pytest.raises(LoRAError, match="DoRA adapters cannot be served unmerged"):
        small.runner.lora.load("dora", dora)
    with pytest.raises(LoRAError, match="not a PEFT adapter directory"):
        small.runner.lora.load("nothing", tmp_path)
    assert small.runner.lora.adapters == {}  # a refused adapter takes no slot


BGMV_CHECK = """
import torch
from engine.kernels.lora_triton import bgmv_expand, bgmv_shrink
from engine.lora import lora_delta_grouped
gen = torch.Generator().manual_seed(0)
sizes, num_slots, rank, in_features = [24, 8, 8], 3, 12, 40  # a fused qkv-like layer; rank not a power of two
a = torch.randn(num_slots, len(sizes), rank, in_features, generator=gen)
b = torch.randn(num_slots, sum(sizes), rank, generator=gen)
x = torch.randn(7, in_features, generator=gen)
y = torch.randn(7, sum(sizes), generator=gen)
slots = torch.tensor([0, -1, 2, 2, 1, -1, 0])
v = bgmv_shrink(x, a, slots)
out = bgmv_expand(v, b, slots, y.clone(), torch.tensor([0, 24, 32], dtype=torch.int32),
                  torch.tensor(sizes, dtype=torch.int32), max(sizes))
groups = [(s, (slots == s).nonzero().squeeze(1)) for s in range(num_slots)]
torch.testing.assert_close(out, lora_delta_grouped(x, y.clone(), groups, a, b, sizes), rtol=1e-5, atol=1e-4)
assert torch.equal(out[slots < 0], y[slots < 0]), "base tokens were changed"
"""


def test_triton_bgmv_matches_segment_gather():
    pytest.importorskip("triton")
    # triton reads TRITON_INTERPRET when it is imported, so the CPU interpreter runs in a fresh process
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, "-c", BGMV_CHECK], cwd=Path(__file__).resolve().parents[1], env=env,
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
