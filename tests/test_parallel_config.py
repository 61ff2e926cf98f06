"""Strategy/option combinations refused at validation, the first-step guard, the DeepSpeed config, FP8 layer selection."""
from __future__ import annotations

import json

import pytest
import torch

from parallel.base import FirstStepGuard, TrainingBrokenError, build_strategy
from trainer.config import ConfigError, build_config, validate


def _validated(**tree):
    nested: dict = {"device": "cpu", "precision": "fp32"}
    for key, value in tree.items():
        section, _, leaf = key.partition("__")
        if leaf:
            nested.setdefault(section, {})[leaf] = value
        else:
            nested[section] = value
    return validate(build_config(nested))


@pytest.mark.parametrize("tree,message", [
    ({"parallel__strategy": "ddp", "parallel__offload": "optimizer"}, "parallel.offload=optimizer"),
    ({"parallel__strategy": "fsdp2", "parallel__offload": "optimizer"}, "use parallel.offload=params"),
    ({"parallel__strategy": "zero2", "parallel__offload": "params"}, "parallel.offload=params needs sharded"),
    ({"parallel__strategy": "zero3", "parallel__reshard_after_forward": False}, "fsdp2 option"),
    ({"parallel__strategy": "ddp", "parallel__async_checkpoint": True}, "parallel.async_checkpoint"),
    ({"parallel__strategy": "fsdp2", "parallel__deepspeed_config": "ds.json"}, "only read by zero"),
    ({"parallel__strategy": "zero2", "parallel__deepspeed_config": "/nonexistent.json"}, "does not exist"),
    ({"parallel__timeout_s": 0}, "parallel.timeout_s"),
    # DeepSpeed's offload steps its own fp32 CPU Adam: a bitsandbytes optimizer would be silently replaced
    ({"parallel__strategy": "zero2", "parallel__offload": "optimizer", "train__optimizer": "adamw_8bit"}, "train.optimizer=adamw_8bit cannot run"),
    # the silent QLoRA failure: packed NF4 storage of another dtype than the sharded params
    ({"parallel__strategy": "fsdp2", "quant__load_in_4bit": True, "quant__quant_storage": "uint8"}, "quant.quant_storage=fp32"),
    ({"parallel__strategy": "zero3", "quant__load_in_4bit": True, "quant__quant_storage": "bf16"}, "quant.quant_storage=fp32"),
])
def test_incompatible_options_are_refused_with_the_key(tree, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        _validated(**tree)


def test_compatible_options_validate():
    _validated(parallel__strategy="fsdp2", quant__load_in_4bit=True, quant__quant_storage="fp32")
    _validated(parallel__strategy="zero2", quant__load_in_4bit=True)  # ZeRO-2 keeps whole params: any storage
    _validated(parallel__strategy="zero3", parallel__offload="params")
    _validated(parallel__strategy="ddp")  # ddp on one process is fine


def test_single_strategy_under_torchrun_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="torchrun started 2 processes"):
        _validated()


def test_first_step_guard_stops_silent_nan_training():
    cfg = _validated(parallel__strategy="fsdp2", quant__load_in_4bit=True, quant__quant_storage="fp32")
    guard = FirstStepGuard(cfg)
    guard.observe_loss(torch.tensor(0.0))
    guard.observe_grad_norm(float("nan"))
    with pytest.raises(TrainingBrokenError, match=r"rank 3: first step has loss=0, grad_norm=nan.*quant_storage=fp32"):
        guard.check(rank=3)
    healthy = FirstStepGuard(cfg)
    healthy.observe_loss(torch.tensor(2.5))
    healthy.observe_grad_norm(1.3)
    healthy.check()
    healthy.observe_loss(torch.tensor(float("nan")))  # later steps are divergence, not a broken setup
    healthy.check()


def test_single_strategy_guard_runs_in_optimizer_step():
    cfg = _validated()
    strategy = build_strategy(cfg)
    layer = torch.nn.Linear(4, 4)
    model, opt = strategy.wrap(layer, lambda ps: torch.optim.SGD(ps, lr=0.1))
    loss = model(torch.full((2, 4), float("nan"))).sum()
    strategy.backward(loss, model)
    strategy.clip_grad_norm(model, 1.0)
    before = layer.weight.detach().clone()
    with pytest.raises(TrainingBrokenError):
        strategy.optimizer_step(model, opt)
    assert torch.equal(layer.weight, before)  # the broken step was not taken


def test_deepspeed_config_is_generated_from_ours_and_user_json_wins(tmp_path):
    pytest.importorskip("deepspeed")
    from parallel.zero import ZeroStrategy, deepspeed_config

    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"zero_optimization": {"reduce_bucket_size": 1234}, "gradient_clipping": 0.5}))
    cfg = _validated(parallel__strategy="zero3", parallel__offload="params", parallel__deepspeed_config=str(user),
                     train__micro_batch_size=2, train__grad_accum=3)
    ds = deepspeed_config(cfg, world_size=4, on_gpu=False)
    assert ds["train_batch_size"] == 2 * 3 * 4 and ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert ds["bf16"]["enabled"] is False  # CPU runs in fp32
    merged = ZeroStrategy(cfg).ds_config()
    assert merged["gradient_clipping"] == 0.5 and merged["zero_optimization"]["reduce_bucket_size"] == 1234
    assert merged["zero_optimization"]["stage"] == 3  # untouched keys survive the merge


def test_deepspeed_buffers_are_sized_from_the_model_layer():
    """Buckets and ZeRO-3 prefetch follow one decoder layer (not DeepSpeed's absolute 5e8 defaults); the user's JSON still wins."""
    pytest.importorskip("deepspeed")
    import transformers

    from parallel.zero import deepspeed_config

    hf = transformers.LlamaConfig(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                                  intermediate_size=8192, vocab_size=128256)
    layer = 2 * 2048 * 2048 + 2 * 2048 * 512 + 3 * 2048 * 8192 + 2 * 2048  # q, o + k, v + MLP + two norms
    z2 = deepspeed_config(_validated(parallel__strategy="zero2"), world_size=2, on_gpu=True, hf_config=hf)["zero_optimization"]
    assert z2["reduce_bucket_size"] == z2["allgather_bucket_size"] == layer  # already a multiple of 512
    assert z2["overlap_comm"] is True and "stage3_prefetch_bucket_size" not in z2
    z3 = deepspeed_config(_validated(parallel__strategy="zero3", lora__enabled=True, lora__rank=16), 2, True, hf)["zero_optimization"]
    assert z3["stage3_prefetch_bucket_size"] == layer and z3["stage3_max_reuse_distance"] == 2 * layer
    assert z3["stage3_max_live_parameters"] == 3 * layer
    assert z3["stage3_param_persistence_threshold"] == 16 * 8192  # the widest LoRA adapter stays gathered


def test_zero_offload_steps_deepspeed_cpu_adam_with_the_trainers_hyperparameters():
    """Offloading changes where the step runs, not what it computes: groups, lr, betas, eps and decay carry over."""
    pytest.importorskip("deepspeed")
    from parallel.zero import host_adam

    w, b = torch.nn.Parameter(torch.ones(4, 4)), torch.nn.Parameter(torch.ones(4))
    built = torch.optim.AdamW([{"params": [w], "weight_decay": 0.1}, {"params": [b], "weight_decay": 0.0}],
                              lr=3e-4, betas=(0.9, 0.95), eps=1e-6)
    try:
        adam = host_adam(built)
    except Exception as e:  # the CPU-Adam extension is JIT-built; CI prebuilds it (install.sh dev)
        pytest.skip(f"DeepSpeed CPU Adam is not available here: {e}")
    assert [g["weight_decay"] for g in adam.param_groups] == [0.1, 0.0]
    assert adam.param_groups[0]["params"] == [w] and adam.param_groups[1]["params"] == [b]
    assert adam.defaults["lr"] == 3e-4 and tuple(adam.defaults["betas"]) == (0.9, 0.95) and adam.defaults["eps"] == 1e-6


def test_fp8_skips_head_adapters_small_and_misaligned_linears():
    from parallel.fp8 import fp8_eligible

    assert fp8_eligible("model.layers.0.mlp.up_proj", torch.nn.Linear(4096, 14336))
    assert not fp8_eligible("lm_head", torch.nn.Linear(4096, 128256))
    assert not fp8_eligible("model.layers.0.self_attn.q_proj", torch.nn.Linear(576, 576))  # small
    assert not fp8_eligible("model.layers.0.mlp.up_proj", torch.nn.Linear(4096, 4100))  # not a multiple of 16
    assert not fp8_eligible("base_model.model.layers.0.q_proj.lora_A.default", torch.nn.Linear(4096, 16))
    assert fp8_eligible("base_model.model.layers.0.q_proj.base_layer", torch.nn.Linear(4096, 4096))
    assert not fp8_eligible("model.norm", torch.nn.LayerNorm(4096))


def test_fp8_without_torchao_or_with_zero_is_refused():
    from parallel.fp8 import maybe_apply_fp8

    cfg = build_config({"precision": "fp8", "parallel": {"strategy": "zero3"}, "device": "cuda"})
    with pytest.raises(ConfigError, match="precision=fp8 works with single, ddp and fsdp2"):
        cfg.parallel.check(cfg)
    try:
        import torchao  # noqa: F401
    except ImportError:
        with pytest.raises(RuntimeError, match="pip install torchao"):
            maybe_apply_fp8(torch.nn.Linear(2048, 2048), build_config({"precision": "fp8"}))
    assert maybe_apply_fp8(torch.nn.Linear(8, 8), build_config({"precision": "bf16"})) == []
