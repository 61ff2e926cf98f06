"""Unmerged multi-LoRA in the engine: a batch mixing the base model and two PEFT adapters gives the
same greedy tokens as PEFT in transformers and as each adapter run alone (fp32, CPU); the adapter
is part of the prefix-cache key; more adapters than slots are served by on-demand activation from an
LRU CPU cache; unservable adapters are refused with a clear message; the two-kernel Triton SGMV
(CPU interpreter) equals the torch reference, alone and inside the engine."""
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
from engine.lora import LoRAError
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
    options = dict(dict(enable_lora=True, max_loras=2, max_lora_rank=8, num_blocks=128), **options)
    return LLMEngine(base_dir, dtype="fp32", device="cpu", **options)


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
    first_slot, first_id = first.slot, first.adapter_id
    lora.load("some", adapters["some"])
    third = lora.load("third", adapters["all"])  # both slots taken: registered, waits in CPU memory
    assert third.slot is None and third.adapter_id not in lora.slot_by_id
    with pytest.raises(LoRAError, match="already loaded"):
        lora.load("all", adapters["all"])
    lora.unload("all")
    again = lora.load("all", adapters["all"])
    assert again.slot == first_slot and again.adapter_id != first_id  # ids never reused: no stale prefix hits

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


def test_more_adapters_than_slots_are_activated_on_demand_lru(tiny_llama_dir, adapters, tmp_path):
    engine = lora_engine(tiny_llama_dir, max_loras=1)
    lora = engine.runner.lora
    lora.max_cpu_loras = 2
    third = make_adapter(tiny_llama_dir, tmp_path / "third", seed=3, rank=8, targets=["o_proj", "up_proj"])
    ids = {name: lora.load(name, path).adapter_id for name, path in [*adapters.items(), ("third", third)]}
    assert [a.name for a in lora.resident()] == ["all"]  # one slot: the first adapter took it
    assert lora.cached_on_cpu() == ["some", "third"]  # the CPU cache keeps the 2 most recent

    assert lora.activate("some", busy_ids={ids["all"]}) is None, "evicted an adapter that requests still use"
    batch = prompts(2, seed=3)
    for name in ("some", "third", "all"):  # "all" comes back from its directory: it left the CPU cache
        assert lora.activate(name).slot == 0
        assert [a.name for a in lora.resident()] == [name] and lora.adapters[name].adapter_id == ids[name]
        assert run(engine, [(p, ids[name]) for p in batch]) == hf_greedy(tiny_llama_dir, lora.adapters[name].path, batch)
    assert lora.cached_on_cpu() == ["third", "all"]


SGMV_CHECK = """
import torch
from engine.kernels.lora_segments import segments_from_groups, segments_on_device
from engine.kernels.lora_triton import expand_block_n, sgmv_lora, shrink_splits
from engine.lora import lora_delta_grouped
# the split choices of the benchmark shapes (Qwen3-0.6B): ~256 input features per shrink program, at most 8
# splits, none for prefill tiles; 128 expand columns per decode program, 64 per prefill one
assert [shrink_splits(n, 16) for n in (1024, 2048, 3072)] == [(8, 128), (16, 128), (16, 192)]
assert [shrink_splits(n, 64) for n in (200, 1024, 3072)] == [(1, 256), (2, 512), (6, 512)]
assert shrink_splits(96, 16) == (1, 128)
assert (expand_block_n(16), expand_block_n(64)) == (128, 64)

gen = torch.Generator().manual_seed(0)
num_slots, seen = 4, set()
# (fused part sizes, rank, in): 3/2/1 parts; outs 40/144/136 are no multiple of 64 or 128; ranks not all powers of
# two; in 100 (one shrink split, not a multiple of BLOCK_K), 600 (decode: 5 splits of 128, the last partial;
# prefill: 2 of 512), 520 (decode: 5 of 128; prefill: 2)
for sizes, rank, in_features in (([24, 8, 8], 12, 100), ([72, 72], 8, 600), ([136], 16, 520)):
    a = torch.randn(num_slots, len(sizes), rank, in_features, generator=gen) * in_features ** -0.5
    b = torch.randn(num_slots, sum(sizes), rank, generator=gen) * rank ** -0.5
    for num_tokens in (7, 45, 300):  # decode-sized groups (16-row tiles) and a tall prefill one (64-row tiles)
        x = torch.randn(num_tokens, in_features, generator=gen)
        y = torch.randn(num_tokens, sum(sizes), generator=gen)
        slots = torch.randint(-1, num_slots - 1, (num_tokens,), generator=gen)  # slot 3 unused; -1 = base tokens
        slots[:num_tokens * 9 // 10] = 1  # one tall group: uneven counts, over 256 rows at 300 tokens
        slots[-3:] = -1
        groups = [(s, (slots == s).nonzero().squeeze(1)) for s in range(num_slots) if (slots == s).any()]
        expected = lora_delta_grouped(x, y.clone(), groups, a, b, sizes)
        work_lists = [segments_from_groups(groups, x.device)] + [segments_on_device(slots, num_slots, m) for m in (16, 64)]
        for segs in work_lists:  # eager (host-built), graph (device-built, padded with slot -1 items)
            out = sgmv_lora(x, y.clone(), a, b, sizes, segs.rows, segs.item_slot, segs.item_lo, segs.item_hi, segs.block_m)
            torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
            assert torch.equal(out[slots < 0], y[slots < 0]), "base tokens were changed"
            seen.add((segs.block_m, shrink_splits(in_features, segs.block_m)[0] > 1, bool((segs.item_slot < 0).any())))
assert {(16, True), (16, False), (64, True), (64, False)} <= {(m, split) for m, split, _ in seen}, seen
assert any(pad for *_, pad in seen), "no padding items were exercised"
"""

ENGINE_CHECK = """
import json, sys, torch
from tests.test_lora_engine import lora_engine, prompts, run
torch.set_num_threads(1)
base_dir, adapters = sys.argv[1], json.loads(sys.argv[2])
engine = lora_engine(base_dir)
ids = [engine.runner.lora.load(name, path).adapter_id for name, path in adapters.items()]
jobs = [(p, a) for p in prompts(2, seed=5) for a in (0, *ids)]
reference = run(engine, jobs)
for layer in engine.runner.lora.layers.values():
    layer.use_triton = True  # what a GPU engine does; here through the interpreter
assert run(engine, jobs) == reference, "the Triton path's tokens differ from the torch path's"
"""


def _interpreted(script: str, *args: str) -> None:
    pytest.importorskip("triton")
    # triton reads TRITON_INTERPRET when it is imported, so the CPU interpreter runs in a fresh process
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, "-c", script, *args], cwd=Path(__file__).resolve().parents[1], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def test_triton_sgmv_matches_segment_gather():
    _interpreted(SGMV_CHECK)


def test_engine_tokens_through_triton_kernel_equal_torch_path(tiny_llama_dir, adapters):
    _interpreted(ENGINE_CHECK, tiny_llama_dir, json.dumps(adapters))
