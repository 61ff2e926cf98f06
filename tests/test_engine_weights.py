"""Weights in from the trainer (``update_weights``) and from PEFT adapters (merged at load)."""
from __future__ import annotations

import shutil

import pytest
import torch

from engine import LLM, SamplingParams
from engine.sampler import apply_penalties, filter_top_k_top_p_min_p
from engine.sequence import Sequence

PROMPTS = [[5, 900, 33, 1200, 7, 7, 41, 3000, 12], [77, 1500, 8, 9, 10, 2048, 600]]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def full_prompt_logprobs(llm: LLM) -> torch.Tensor:
    """Top-20 prompt logprobs of every position: a fingerprint of the logits."""
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=20))
    return torch.tensor([sorted(e.values()) for o in outs for e in o.prompt_logprobs[1:]])


def test_update_weights_equals_fresh_load(tiny_model_factory):
    from transformers import AutoModelForCausalLM

    old, new = tiny_model_factory("qwen3", seed=0), tiny_model_factory("qwen3", seed=1)
    llm = LLM(old, dtype="fp32", block_size=4, num_blocks=64)
    before = full_prompt_logprobs(llm)
    trainer_model = AutoModelForCausalLM.from_pretrained(new, dtype=torch.float32)
    # names as a PEFT-wrapped trainer model reports them after merging
    named = {f"base_model.model.{k}".replace("q_proj.weight", "q_proj.base_layer.weight"): v
             for k, v in trainer_model.state_dict().items()}
    assert llm.update_weights(named) >= len(named) - 1  # tied lm_head and embed are one tensor
    after = full_prompt_logprobs(llm)
    fresh = full_prompt_logprobs(LLM(new, dtype="fp32", block_size=4, num_blocks=64))
    assert not torch.equal(before, fresh)
    assert torch.equal(after, fresh)


def test_update_weights_rejects_unknown_and_unmerged_names(tiny_llama_dir):
    llm = LLM(tiny_llama_dir, dtype="fp32", num_blocks=16)
    with pytest.raises(ValueError, match="no such parameter"):
        llm.update_weights({"model.layers.99.mlp.up_proj.weight": torch.zeros(128, 64)})
    with pytest.raises(ValueError, match="merge the adapter"):
        llm.update_weights({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight": torch.zeros(4, 64)})
    with pytest.raises(ValueError, match="shape"):
        llm.update_weights({"model.norm.weight": torch.zeros(3)})


def test_adapter_is_merged_at_load(tiny_llama_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"]))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)  # PEFT starts B at zero, which would make the adapter a no-op
    model.save_pretrained(tmp_path / "adapter")
    merged = model.merge_and_unload()
    merged.save_pretrained(tmp_path / "merged", safe_serialization=True)
    with_adapter = full_prompt_logprobs(LLM(tiny_llama_dir, dtype="fp32", num_blocks=64, adapter=str(tmp_path / "adapter")))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(f"{tiny_llama_dir}/{f}", tmp_path / "merged" / f)
    reference = full_prompt_logprobs(LLM(str(tmp_path / "merged"), dtype="fp32", num_blocks=64))
    base = full_prompt_logprobs(LLM(tiny_llama_dir, dtype="fp32", num_blocks=64))
    assert not torch.allclose(base, reference, atol=1e-3)
    torch.testing.assert_close(with_adapter, reference, rtol=0, atol=1e-5)


def _seq(tokens: list[int], prompt_len: int, **params) -> Sequence:
    seq = Sequence("r", 0, tokens[:prompt_len], SamplingParams(**params), None, 4)
    seq.token_ids = list(tokens)
    return seq


def test_penalties_follow_hf_and_openai_definitions():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    rep = apply_penalties(logits.clone(), [_seq([0, 1], 1, repetition_penalty=2.0)])
    assert rep.tolist() == [[1.0, -4.0, 1.0, 0.5]]  # seen tokens: positive logits divided, negative multiplied
    freq = apply_penalties(logits.clone(), [_seq([3, 2, 2], 1, frequency_penalty=0.5, presence_penalty=0.25)])
    assert freq.tolist() == [[2.0, -2.0, 1.0 - 1.0 - 0.25, 0.5]]  # only generated tokens (2, twice) are penalized


def test_top_k_top_p_min_p_filters():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(3, 1)
    kept = filter_top_k_top_p_min_p(logits, torch.tensor([2, 0, 0]), torch.tensor([1.0, 0.7, 1.0]), torch.tensor([0.0, 0.0, 0.2]))
    assert torch.isfinite(kept).tolist() == [
        [True, True, False, False],  # top_k=2
        [True, True, False, False],  # top_p=0.7: 0.5 alone is not enough, 0.5+0.3 is
        [True, True, True, False],  # min_p=0.2: keep p >= 0.1
    ]
