"""The dry-run memory estimator: the ZeRO formulas, strategy ordering, and activations against autograd's own count."""
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
        est = estimate_memory(_cfg(parallel__strategy=strategy), BIG, n)
        assert _model_states(est) == pytest.approx(bytes_per_param(n) * psi, rel=1e-9)


def test_cpu_fp32_has_no_master_copy():
    psi = ModelShape.from_hf(BIG).total_params
    est = estimate_memory(_cfg(parallel__strategy="zero1", device="cpu"), BIG, 4)
    assert _model_states(est) == pytest.approx((4 + 4 + 8 / 4) * psi, rel=1e-9)
    assert any("fp32" in a for a in est.assumptions)


def test_strategy_and_memory_option_ordering():
    total = lambda n=8, **kw: estimate_memory(_cfg(**kw), BIG, n).total  # noqa: E731
    ddp, z1, z2, z3, fsdp = (total(parallel__strategy=s) for s in ("ddp", "zero1", "zero2", "zero3", "fsdp2"))
    assert ddp > z1 > z2 > z3 and ddp > fsdp
    assert total(parallel__strategy="fsdp2", parallel__reshard_after_forward=False) > fsdp
    assert total(parallel__strategy="zero3", n=16) < z3
    # memory options shrink what they claim to
    ac = {m: total(train__activation_checkpointing=m) for m in ("none", "selective", "full", "offload")}
    assert ac["none"] > ac["selective"] > ac["full"] and ac["none"] > ac["offload"]
    assert total(train__optimizer="adamw_8bit") < total()
    assert total(parallel__strategy="zero3", parallel__offload="optimizer") < z3
    assert total(train__loss_chunk_size=0) > total(train__loss_chunk_size=1024)
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
