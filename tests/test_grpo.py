"""GRPO end to end on the real Trainer with colocated engine rollouts: learning, weight-sync parity, rewards."""
from __future__ import annotations

import pytest
import torch

from alignment.rollout import EngineOutOfSync, Rollout, logprob_diff
from alignment.rewards import RewardError
from trainer.config import ConfigError, load_config


def first_token_div4(prompts, completions, completion_ids, **_):
    """A synthetic reward a tiny random model can learn in a few steps (base rate ~26% at temperature 0.1)."""
    return [float(ids[0] % 4 == 0) for ids in completion_ids]


def broken_reward(prompts, completions, **_):
    raise ValueError("cannot parse")


def _cfg(model_dir: str, tmp_path, *overrides: str):
    return load_config([f"model.path={model_dir}", "train.method=grpo", "device=cpu", "precision=fp32", "train.seq_len=96",
                        "train.micro_batch_size=8", "train.grad_accum=2", "grpo.prompts_per_batch=2", "grpo.group_size=8",
                        "grpo.max_tokens=4", "grpo.max_logprob_diff=1e-3", "lora.rank=8", "train.scheduler=constant",
                        "data.num_samples=64", "grpo.eval_problems=8", "engine.num_blocks=64", "checkpoint.save_final=false",
                        f"output_dir={tmp_path}", *overrides])


def _trainer(cfg):
    from trainer.trainer import Trainer

    return Trainer(cfg)


def test_reward_rises_with_rollouts_from_the_synced_engine(tiny_llama_dir, tmp_path):
    # a low temperature sharpens the near-uniform random model so a few steps can move it
    cfg = _cfg(tiny_llama_dir, tmp_path, "train.max_steps=6", "train.lr=1e-2", "grpo.temperature=0.1",
               "grpo.rewards=tests.test_grpo:first_token_div4=1.0")
    trainer = _trainer(cfg)
    history = [r for r in trainer.train() if "reward_mean" in r]
    first, last = history[0]["reward_mean"], sum(r["reward_mean"] for r in history[-3:]) / 3  # first: the initial policy's samples
    assert last > first + 0.3 and last > 0.8, [round(r["reward_mean"], 2) for r in history]
    assert all(r["logprob_diff"] < 1e-3 for r in history)  # the engine sampled from the policy every time
    assert trainer.method.rollout.syncs == cfg.train.max_steps + 1  # setup + one per optimizer step
    assert (tmp_path / "reward.png").stat().st_size > 0


def test_stale_engine_is_caught(tiny_llama_dir, tmp_path, monkeypatch):
    """Skip one weight sync: the next generation's parity check stops the run."""
    from alignment.grpo import GRPOMethod

    cfg = _cfg(tiny_llama_dir, tmp_path, "train.max_steps=3", "train.lr=5e-2", "grpo.rewards=tests.test_grpo:first_token_div4=1.0")
    real = GRPOMethod.after_optimizer_step
    monkeypatch.setattr(GRPOMethod, "after_optimizer_step", lambda self, run, step: {} if step == 1 else real(self, run, step))
    with pytest.raises(EngineOutOfSync, match=r"grpo.max_logprob_diff=0.001"):
        _trainer(cfg).train()


def test_a_failing_reward_function_is_named(tiny_llama_dir, tmp_path):
    cfg = _cfg(tiny_llama_dir, tmp_path, "train.max_steps=1", "grpo.rewards=tests.test_grpo:broken_reward=1.0")
    with pytest.raises(RewardError, match=r"reward function 'tests.test_grpo:broken_reward' raised ValueError: cannot parse"):
        _trainer(cfg).train()


@pytest.mark.parametrize("override,message", [
    ("grpo.group_size=4", r"grpo.prompts_per_batch\*grpo.group_size=8 completions must equal"),
    ("grpo.rewards=nope=1", r"grpo.rewards: unknown reward 'nope'"),
    ("grpo.loss_agg=mean", r"grpo.loss_agg='mean' is not registered"),
])
def test_config_mistakes_are_one_line_errors(tiny_llama_dir, tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        cfg = _cfg(tiny_llama_dir, tmp_path, override)
        from alignment.rewards import build_rewards

        build_rewards(cfg.grpo)


def test_qlora_engine_receives_the_dequantized_merged_weights(tiny_llama_dir, tmp_path):
    """The engine loads the fp checkpoint; after a sync it must score like the NF4 + LoRA policy."""
    from trainer.models import build_model

    cfg = _cfg(tiny_llama_dir, tmp_path, "quant.load_in_4bit=true", "quant.compute_dtype=fp32")
    model = build_model(cfg, "cpu")
    with torch.no_grad():  # non-zero adapters, so the merge term matters too
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    rollout = Rollout(cfg, torch.device("cpu"))
    from engine import SamplingParams

    out = rollout.generate([[1, 2, 3, 4, 5, 6]], SamplingParams(n=2, max_tokens=5, logprobs=0, ignore_eos=True))[0]
    samples = [(out.prompt_token_ids, c.token_ids, [lp[t] for lp, t in zip(c.logprobs, c.token_ids)]) for c in out.outputs]
    assert logprob_diff(model, samples) > 1e-2  # fp checkpoint vs NF4 + adapters: visibly different
    rollout.sync(model, changed_only=False)
    out = rollout.generate([[1, 2, 3, 4, 5, 6]], SamplingParams(n=2, max_tokens=5, logprobs=0, ignore_eos=True))[0]
    samples = [(out.prompt_token_ids, c.token_ids, [lp[t] for lp, t in zip(c.logprobs, c.token_ids)]) for c in out.outputs]
    assert logprob_diff(model, samples) < 1e-3


def test_bf16_run_scores_rollouts_under_the_training_autocast(tiny_llama_dir, tmp_path):
    """precision=bf16 stores the frozen base in bf16 next to fp32 adapters: the parity check and the
    old-log-prob scoring run outside the training step and must use its autocast (they crashed with
    'mat1 and mat2 must have the same dtype' on the first GPU run)."""
    cfg = _cfg(tiny_llama_dir, tmp_path, "precision=bf16", "train.max_steps=1", "grpo.updates_per_batch=2", "train.grad_accum=1",
               "grpo.max_logprob_diff=0.5", "grpo.rewards=tests.test_grpo:first_token_div4=1.0")
    trainer = _trainer(cfg)
    history = trainer.train()
    steps = [r for r in history if "loss" in r]
    assert steps and torch.isfinite(torch.tensor(steps[-1]["loss"]))
    assert steps[-1]["logprob_diff"] < 0.5  # bf16 trainer vs fp32 CPU engine: close, not equal
    assert any("eval_accuracy" in r for r in history)  # evaluation ran the engine inside the trainer's autocast
