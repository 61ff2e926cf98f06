"""The dry-run memory estimator: the ZeRO formulas, DeepSpeed's buffers from the generated config, strategy
ordering, phases, and activations against autograd's own count."""
from __future__ import annotations

import pytest
import torch
import transformers

from trainer.config import build_config
from trainer.memory import ModelShape, estimate_memory

# A Llama-shaped model of ~7.5B parameters, the ZeRO paper's worked example.
BIG = transformers.LlamaConfig(hidden_size=4096, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=32,
                               intermediate_size=11008, vocab_size=32000, tie_word_embeddings=False)


def _cfg(**sections):
    tree = {"lora": {"enabled": False}, "device": "cuda", "precision": "bf16"}
    for key, value in sections.items():
        section, _, leaf = key.partition("__")
        if leaf:
            tree.setdefault(section, {})[leaf] = value
        else:
            tree[section] = value
    return build_config(tree)  # built, not validated: this machine has no GPU


def _model_states(est) -> float:
    return sum(b for name, b in est.rows if name.startswith(("trainable weights", "gradients", "optimizer")))


@pytest.mark.parametrize("strategy,bytes_per_param", [
    ("zero1", lambda n: 2 + 2 + 12 / n), ("zero2", lambda n: 2 + 14 / n), ("zero3", lambda n: 16 / n),
    ("fsdp2", lambda n: 16 / n), ("ddp", lambda n: 16),
])
def test_full_finetune_model_states_follow_zero_formulas(strategy, bytes_per_param):
    psi = ModelShape.from_hf(BIG).total_params
    assert 7.4e9 < psi < 7.6e9  # 16 B/param: ~120 GB with DDP, ~1.9 GB per GPU with ZeRO-3 on 64 GPUs
    for n in (2, 8, 64):
        # with accumulation, ZeRO-1 keeps full gradients between boundaries: the paper's case
        est = estimate_memory(_cfg(parallel__strategy=strategy, train__grad_accum=4), BIG, n)
        assert _model_states(est) == pytest.approx(bytes_per_param(n) * psi, rel=1e-9)


def test_zero1_without_accumulation_keeps_only_the_gradient_partition():
    """DeepSpeed reduces each gradient into its owner's partition at every boundary: ZeRO-2's 2/N gradients."""
    psi = ModelShape.from_hf(BIG).total_params
    est = estimate_memory(_cfg(parallel__strategy="zero1", train__grad_accum=1), BIG, 8)
    assert _model_states(est) == pytest.approx((2 + 2 / 8 + 12 / 8) * psi, rel=1e-9)
    assert any("grad_accum=1" in a for a in est.assumptions)


def test_cpu_fp32_has_no_master_copy():
    psi = ModelShape.from_hf(BIG).total_params
    est = estimate_memory(_cfg(parallel__strategy="zero1", device="cpu", train__grad_accum=2), BIG, 4)
    assert _model_states(est) == pytest.approx((4 + 4 + 8 / 4) * psi, rel=1e-9)
    assert any("fp32" in a for a in est.assumptions)


def test_strategy_and_memory_option_ordering():
    total = lambda n=8, **kw: estimate_memory(_cfg(**kw), BIG, n).total  # noqa: E731
    ddp, z1, z2, z3, fsdp = (total(parallel__strategy=s, train__grad_accum=4) for s in ("ddp", "zero1", "zero2", "zero3", "fsdp2"))
    assert ddp > z1 > z2 > z3 and ddp > fsdp
    assert total(parallel__strategy="zero1") == total(parallel__strategy="zero2")  # no accumulation: same gradients
    assert total(parallel__strategy="fsdp2", parallel__reshard_after_forward=False) > fsdp
    assert total(parallel__strategy="zero3", n=16) < z3
    # memory options shrink what they claim to
    ac = {m: total(train__activation_checkpointing=m) for m in ("none", "selective", "full", "offload")}
    assert ac["none"] > ac["selective"] > ac["full"] and ac["none"] > ac["offload"]
    assert total(train__optimizer="adamw_8bit") < total()
    assert total(parallel__strategy="zero3", parallel__offload="optimizer") < z3
    assert total(train__loss_chunk_size=0) > total(train__loss_chunk_size=1024)
    # token-sliced MLP: the recomputed layer holds 1/4 of its [tokens, intermediate] buffers (bf16, 4.5 values each)
    tokens = 4 * 512  # micro_batch_size x seq_len of the default config
    sliced = total(train__activation_checkpointing="full", train__micro_batch_size=4, train__mlp_token_chunks=4)
    whole = total(train__activation_checkpointing="full", train__micro_batch_size=4)
    assert whole - sliced == pytest.approx(2 * 4.5 * 11008 * tokens * 3 / 4)
    lora = total(lora__enabled=True)
    qlora = total(lora__enabled=True, quant__load_in_4bit=True)
    assert ddp > lora > qlora


def test_qlora_base_bytes_match_bitsandbytes():
    """The NF4 row equals what bitsandbytes actually stores for the quantized linears (+ fp32 rest)."""
    pytest.importorskip("bitsandbytes")
    from trainer.models import quantize_model_nf4

    hf = transformers.LlamaConfig(hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  intermediate_size=512, vocab_size=512, tie_word_embeddings=True, head_dim=64)
    cfg = _cfg(device="cpu", precision="fp32", lora__enabled=True, quant__load_in_4bit=True)
    model = quantize_model_nf4(transformers.AutoModelForCausalLM.from_config(hf, dtype=torch.float32), cfg)
    model.to("cpu")  # bitsandbytes quantizes when the weights are moved to their device
    stored = 0
    for p in model.parameters():
        stored += p.numel() * p.element_size()
        qs = getattr(p, "quant_state", None)
        if qs is not None:
            stored += qs.absmax.numel() * qs.absmax.element_size()
            if qs.state2 is not None:
                stored += qs.state2.absmax.numel() * 4 + qs.state2.code.numel() * 4
    est = dict(estimate_memory(cfg, hf, 1).rows)
    assert est["frozen base weights"] == pytest.approx(stored, rel=0.02)


@pytest.mark.parametrize("autocast", [False, True])
def test_activation_row_matches_autograd_saved_tensors(autocast):
    """Count the bytes autograd saves in a real forward and compare with the per-layer formula."""
    hf = transformers.LlamaConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  intermediate_size=344, vocab_size=64, head_dim=32)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(hf, dtype=torch.float32)
    tokens = 256
    saved: dict[int, int] = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        model.model(torch.randint(0, 64, (1, tokens)), use_cache=False)
    embedding_and_norm = 2 * tokens * hf.hidden_size * 4  # saved outside the decoder layers
    measured = (sum(saved.values()) - embedding_and_norm) / hf.num_hidden_layers
    predicted = ModelShape.from_hf(hf).activation_bytes_per_token(mixed=autocast, lora=False) * tokens
    assert measured == pytest.approx(predicted, rel=0.15)


def test_report_names_every_row_and_assumption():
    est = estimate_memory(_cfg(parallel__strategy="fsdp2", lora__enabled=True), BIG, 8)
    text = est.format_table()
    assert est.total == pytest.approx(sum(b for _, b in est.rows))
    for name, _ in est.rows:
        assert name in text
    assert "sharded" in text and "LoRA r=16" in text


def _rows(est) -> dict[str, float]:
    return {name.split(" (")[0]: b for name, b in est.rows + est.step_rows}


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_deepspeed_buffers_come_from_the_generated_config(stage, tmp_path):
    """Bucket rows use the resolved DeepSpeed config's sizes: ours by default, the user's JSON when it overrides them."""
    import json

    pytest.importorskip("deepspeed")
    from parallel.zero import resolved_deepspeed_config

    cfg = _cfg(parallel__strategy=f"zero{stage}")
    zero = resolved_deepspeed_config(cfg, 8, True, BIG)["zero_optimization"]
    layer = ModelShape.from_hf(BIG).layer_params
    assert layer <= zero["reduce_bucket_size"] < layer + 512  # one decoder layer, NCCL-aligned
    rows = _rows(estimate_memory(cfg, BIG, 8))
    buffers = 2 if stage < 3 else 1  # stages 1-2 double-buffer under overlap_comm; stage 3 keeps one
    bucket_row = "DeepSpeed gradient buckets" if stage < 3 else "DeepSpeed stage-3 gradient bucket"
    assert rows[bucket_row] == buffers * zero["reduce_bucket_size"] * 2
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"zero_optimization": {"reduce_bucket_size": 500_000_000}}))
    cfg.parallel.deepspeed_config = str(user)
    assert _rows(estimate_memory(cfg, BIG, 8))[bucket_row] == buffers * 500_000_000 * 2


def test_deepspeed_step_copies_count_only_in_the_optimizer_step():
    """step() flattens the bf16 gradient partition and casts it to fp32 after activations are freed:
    the peak is the larger phase, and a huge micro-batch moves it to forward/backward."""
    psi = ModelShape.from_hf(BIG).total_params
    small = estimate_memory(_cfg(parallel__strategy="zero2", train__micro_batch_size=1, train__seq_len=128), BIG, 2)
    step = dict(small.step_rows)
    assert sum(step.values()) == pytest.approx((2 + 4) * psi / 2, rel=1e-9)
    assert small.peak_phase == "optimizer step" and small.total == small.step_total > sum(b for _, b in small.rows) - 1
    big = estimate_memory(_cfg(parallel__strategy="zero2", train__micro_batch_size=64, train__seq_len=4096), BIG, 2)
    assert big.peak_phase == "forward/backward" and big.total == pytest.approx(sum(b for _, b in big.rows))
    offloaded = estimate_memory(_cfg(parallel__strategy="zero2", parallel__offload="optimizer"), BIG, 2)
    assert offloaded.step_rows == []  # the step runs on the host


def test_zero3_gathered_layers_follow_prefetch_and_reuse_distance(tmp_path):
    """Our config gathers the current + one prefetched layer; DeepSpeed's default 1e9 reuse distance keeps
    the last forward layers gathered into the backward, which the estimate must then count."""
    import json

    pytest.importorskip("deepspeed")
    cfg = _cfg(parallel__strategy="zero3")
    ours = estimate_memory(cfg, BIG, 8)
    assert any(name.startswith("gathered weights (root + 2 layers)") for name, _ in ours.rows)
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"zero_optimization": {"stage3_max_reuse_distance": 1_000_000_000}}))
    cfg.parallel.deepspeed_config = str(user)
    defaults = estimate_memory(cfg, BIG, 8)
    gathered = next(name for name, _ in defaults.rows if name.startswith("gathered weights"))
    assert gathered != "gathered weights (root + 2 layers)" and defaults.total > ours.total


@pytest.mark.parametrize("arch,lora", [("llama", False), ("qwen2", False), ("llama", True)])
def test_model_state_rows_equal_real_tensors_after_a_step(arch, lora):
    """Weights, gradients and AdamW states of a real model after one step, byte for byte."""
    cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}[arch]
    hf = cls(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
             vocab_size=200, tie_word_embeddings=arch == "llama")
    model = transformers.AutoModelForCausalLM.from_config(hf, dtype=torch.float32)
    cfg = _cfg(device="cpu", precision="fp32", lora__enabled=lora, lora__rank=4)
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, target_modules=list(cfg.lora.target_modules)))
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable)
    ids = torch.randint(0, 200, (1, 8))
    model(ids, labels=ids).loss.backward()
    opt.step()
    nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
    rows = dict(estimate_memory(cfg, hf, 1).rows)
    assert rows["trainable weights (fp32)"] == nbytes(trainable)
    assert rows["gradients (fp32)"] == nbytes(p.grad for p in trainable)
    states = [v for s in opt.state.values() for k, v in s.items() if k != "step"]
    assert rows["optimizer: Adam states"] == nbytes(states)
    if lora:
        assert rows["frozen base weights"] == nbytes(p for p in model.parameters() if not p.requires_grad)


def test_nf4_eval_forward_is_the_training_forward():
    """A QLoRA model's eval forward computes what its training forward does — dequantize, then an fp32
    matmul — on every CPU: bitsandbytes' AVX512-BF16 fused kernel (bf16 activations) stays off."""
    pytest.importorskip("bitsandbytes")
    import bitsandbytes.functional as bnbf

    from trainer.models import build_model

    cfg = _cfg(device="cpu", precision="fp32", lora__enabled=False, quant__load_in_4bit=True, model__init="random",
               model__hidden_size=128, model__num_layers=1, model__num_heads=4, model__num_kv_heads=2,
               model__intermediate_size=256, model__vocab_size=64)
    model = build_model(cfg).eval()
    layer = model.model.layers[0].mlp.up_proj
    x = torch.randn(3, 5, 128)
    with torch.no_grad():
        expected = x @ bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float().T
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)  # the second call too (no repacking)
