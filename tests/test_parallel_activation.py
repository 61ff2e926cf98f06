"""Activation checkpointing: same gradients as without it, fewer saved activations, unchanged weight names."""
from __future__ import annotations

import copy

import pytest
import torch
import transformers

from parallel.activation import apply_activation_checkpointing, checkpointed_layer_indices, decoder_layers
from trainer.config import build_config


def _tiny(layers: int = 4):
    c = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                 intermediate_size=128, vocab_size=128, head_dim=16)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(c, dtype=torch.float32)


def _cfg(mode: str, k: int = 2):
    return build_config({"train": {"activation_checkpointing": mode, "ac_every_k": k}})


def _loss_and_saved_bytes(model, ids):
    saved: dict[int, int] = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(ids, labels=ids, use_cache=False).loss
    loss.backward()
    return loss.item(), sum(saved.values())


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("mode", ["full", "selective", "offload"])
def test_checkpointing_keeps_gradients_and_saves_memory(mode):
    ids = torch.randint(0, 128, (2, 64), generator=torch.Generator().manual_seed(1))
    ref = _tiny()
    ac = copy.deepcopy(ref)
    ref_loss, ref_saved = _loss_and_saved_bytes(ref, ids)
    keys = list(ac.state_dict())
    apply_activation_checkpointing(ac, _cfg(mode))
    loss, saved = _loss_and_saved_bytes(ac, ids)
    assert loss == pytest.approx(ref_loss, abs=1e-6)
    for name, g in _grads(ref).items():
        torch.testing.assert_close(_grads(ac)[name], g, rtol=1e-5, atol=1e-6, msg=name)
    assert list(ac.state_dict()) == keys  # exports and resumes see the same parameter names
    # save_on_cpu packs the layers' tensors with its own (innermost) hooks, so for offload the
    # counter sees only what stays on the device, like it does for recomputed layers
    if mode in ("full", "offload"):
        assert saved < 0.3 * ref_saved
    else:  # half the layers checkpointed
        assert 0.4 * ref_saved < saved < 0.8 * ref_saved


def test_checkpointing_peft_model_trains_adapters_only():
    from peft import LoraConfig, get_peft_model

    ids = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(2))
    ref = get_peft_model(_tiny(2), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    ac = copy.deepcopy(ref)
    apply_activation_checkpointing(ac, _cfg("full"))
    _loss_and_saved_bytes(ref, ids)
    _loss_and_saved_bytes(ac, ids)
    grads = _grads(ac)
    assert grads and all("lora_" in n for n in grads)
    for name, g in _grads(ref).items():
        torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-6)


def test_layer_selection_and_idempotence():
    assert checkpointed_layer_indices(6, "selective", 2) == [1, 3, 5]
    assert checkpointed_layer_indices(6, "selective", 3) == [2, 5]
    assert checkpointed_layer_indices(6, "full", 2) == list(range(6))
    assert checkpointed_layer_indices(6, "none", 2) == []
    model = _tiny(4)
    assert len(decoder_layers(model)) == 4
    assert apply_activation_checkpointing(model, _cfg("full")) == [0, 1, 2, 3]
    apply_activation_checkpointing(model, _cfg("full"))  # a second pass must not nest checkpoints
    ids = torch.randint(0, 128, (1, 16))
    _, saved_once = _loss_and_saved_bytes(model, ids)
    assert saved_once > 0
    assert apply_activation_checkpointing(_tiny(2), _cfg("none")) == []


def _largest_mlp_activation(model, ids, intermediate: int):
    """Loss and the most rows any saved ``[..., intermediate]`` activation has (weights excluded)."""
    rows: list[int] = [0]
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(t):
        if t.shape[-1:] == (intermediate,) and t.untyped_storage().data_ptr() not in weights:
            rows.append(t.numel() // intermediate)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(ids, labels=ids, use_cache=False).loss
    loss.backward()
    return loss.item(), max(rows)


@pytest.mark.parametrize("checkpointing", ["none", "full"])
def test_mlp_token_chunks_same_gradients_smaller_mlp_buffers(checkpointing):
    """train.mlp_token_chunks: identical loss and gradients, names unchanged, the MLP's [tokens, intermediate]
    buffers (the largest a layer saves) cut by the chunk count; composes with checkpointing."""
    from parallel.activation import apply_mlp_token_chunks

    c = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                 intermediate_size=512, vocab_size=128, head_dim=16)
    torch.manual_seed(0)
    ref = transformers.AutoModelForCausalLM.from_config(c, dtype=torch.float32)
    tiled = copy.deepcopy(ref)
    keys = list(tiled.state_dict())
    assert apply_mlp_token_chunks(tiled, 4) == 2 and apply_mlp_token_chunks(tiled, 4) == 2  # idempotent: no nesting
    assert apply_mlp_token_chunks(copy.deepcopy(ref), 1) == 0
    if checkpointing != "none":
        apply_activation_checkpointing(ref, _cfg(checkpointing))
        apply_activation_checkpointing(tiled, _cfg(checkpointing))
    ids = torch.randint(0, 128, (2, 63), generator=torch.Generator().manual_seed(3))  # 126 tokens: uneven slices
    ref_loss, ref_rows = _largest_mlp_activation(ref, ids, 512)
    loss, tiled_rows = _largest_mlp_activation(tiled, ids, 512)
    assert loss == pytest.approx(ref_loss, abs=1e-5)
    for name, g in _grads(ref).items():
        torch.testing.assert_close(_grads(tiled)[name], g, rtol=1e-4, atol=1e-6, msg=name)
    assert list(tiled.state_dict()) == keys
    if checkpointing == "none":  # what autograd keeps of the MLP: [126, 512] before, slices of at most 32 rows after
        assert ref_rows == 126 and 0 < tiled_rows <= 32


def test_mlp_token_chunks_needs_an_mlp_submodule():
    from parallel.activation import apply_mlp_token_chunks

    model = torch.nn.Sequential(torch.nn.ModuleList([torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)]))
    with pytest.raises(ValueError, match="train.mlp_token_chunks=2 needs decoder layers with an `mlp`"):
        apply_mlp_token_chunks(model, 2)
