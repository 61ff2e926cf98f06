"""AWQ: activation-aware int4 weight quantization, saved in the AutoAWQ GEMM layout.

Per decoder layer (Lin et al. 2023, following AutoAWQ's defaults):
  1. run the layer on calibration activations, recording every linear's input;
  2. for each scaling group (norm -> q/k/v, norm -> gate/up, v -> o when shapes allow, up -> down)
     search s = x_mean^a / w_mean^(1-a) over a in [0, 1) (grid 20) for the lowest output error of the
     module that consumes the group, with the linears fake-quantized; fold s into the previous op
     (exact before quantization);
  3. search a per-(row, group) clipping threshold for every linear except q/k;
  4. quantize: asymmetric int4, per group of ``group_size`` input channels.

Checkpoint (what vLLM/transformers load as ``quant_method: awq``, ``version: gemm``): per linear
``qweight`` int32 [in, out/8] and ``qzeros`` int32 [in/g, out/8] (8 nibbles packed in the order
0,2,4,6,1,3,5,7), ``scales`` fp16 [in/g, out]; everything else fp16.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from trainer.config import ConfigError

AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]
AWQ_REVERSE_ORDER = [0, 4, 1, 5, 2, 6, 3, 7]
GROUP_CANDIDATES = (128, 64, 32)


# ---------------------------------------------------------------------------------------------
# Quantization primitives
# ---------------------------------------------------------------------------------------------
def quantize_groups(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [out, in] -> (q [out, in] in 0..15, zeros [out, in/g], scales [out, in/g]), AutoAWQ's rounding."""
    out_f, in_f = w.shape
    g = w.float().reshape(out_f, in_f // group, group)
    hi, lo = g.amax(-1), g.amin(-1)
    scales = ((hi - lo).clamp(min=1e-5) / 15)
    zeros = (-torch.round(lo / scales)).clamp(0, 15)
    q = (torch.round(g / scales[..., None]) + zeros[..., None]).clamp(0, 15)
    return q.reshape(out_f, in_f).to(torch.int32), zeros.to(torch.int32), scales


def fake_quantize(w: torch.Tensor, group: int) -> torch.Tensor:
    """Round-trip through int4 (what the quantized layer will compute with), in w's dtype."""
    q, zeros, scales = quantize_groups(w, group)
    out_f, in_f = w.shape
    deq = (q.reshape(out_f, -1, group) - zeros[..., None]) * scales[..., None]
    return deq.reshape(out_f, in_f).to(w.dtype)


def pack_int4(values: torch.Tensor) -> torch.Tensor:
    """int [rows, cols] (0..15) -> int32 [rows, cols/8], nibble i holding column AWQ_ORDER[i] of each 8."""
    rows, cols = values.shape
    v = values.to(torch.int32).reshape(rows, cols // 8, 8)[..., AWQ_ORDER]
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=values.device)
    # bitwise OR of disjoint nibbles == their sum; int64 avoids overflow before the int32 wrap
    packed = (v.to(torch.int64) << shifts.to(torch.int64)).sum(-1)
    return (packed - ((packed >> 31) << 32)).to(torch.int32)  # two's-complement view of the top bit


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """int32 [rows, cols/8] -> int32 [rows, cols] (inverse of ``pack_int4``)."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=packed.device)
    nibbles = (packed[..., None] >> shifts) & 0xF  # [rows, cols/8, 8] in packed order
    return nibbles[..., AWQ_REVERSE_ORDER].reshape(packed.shape[0], -1)


def awq_dequant(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group: int) -> torch.Tensor:
    """AutoAWQ GEMM tensors -> the nn.Linear weight [out, in] in ``scales``' dtype."""
    w = unpack_int4(qweight)  # [in, out]
    z = unpack_int4(qzeros).repeat_interleave(group, 0)
    s = scales.repeat_interleave(group, 0)
    return ((w - z).to(s.dtype) * s).t().contiguous()


def pack_linear(w: torch.Tensor, group: int) -> dict[str, torch.Tensor]:
    q, zeros, scales = quantize_groups(w, group)
    return {"qweight": pack_int4(q.t().contiguous()), "qzeros": pack_int4(zeros.t().contiguous()),
            "scales": scales.t().contiguous().to(torch.float16)}


def choose_group_size(in_features: list[int], requested: int, fallback: bool) -> int:
    """``requested`` when it divides every linear's input size, else the largest of 128/64/32 that does.

    SmolLM2-135M has hidden 576 = 4.5 x 128, so AutoAWQ's g128 is impossible there; g64 is the
    nearest group size every kernel supports (vLLM's AWQ accepts any g that divides in_features).
    """
    if all(n % requested == 0 for n in in_features):
        return requested
    bad = sorted({n for n in in_features if n % requested})
    if not fallback:
        raise ConfigError(f"awq.group_size={requested} does not divide the input size of some layers ({bad}); "
                          "pick one that does or set awq.group_fallback=true")
    for g in GROUP_CANDIDATES:
        if g < requested and all(n % g == 0 for n in in_features):
            return g
    raise ConfigError(f"awq: no group size in {GROUP_CANDIDATES} divides the linear input sizes {sorted(set(in_features))}")


# ---------------------------------------------------------------------------------------------
# Calibration plumbing
# ---------------------------------------------------------------------------------------------
class _Stop(Exception):
    pass


def _capture_layer0(model, input_ids: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """The hidden states and keyword arguments (rotary cos/sin, mask) the first decoder layer receives."""
    layer0 = model.model.layers[0]
    seen = {}

    def hook(_module, args, kwargs):
        seen["x"] = args[0] if args else kwargs["hidden_states"]
        seen["kwargs"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        raise _Stop

    handle = layer0.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        model(input_ids=input_ids, use_cache=False)
    except _Stop:
        pass
    finally:
        handle.remove()
    kwargs = {k: v for k, v in seen["kwargs"].items() if k in ("attention_mask", "position_ids", "position_embeddings", "cache_position")}
    return seen["x"], kwargs


def _slice_batch(kwargs: dict, n: int, batch: int) -> dict:
    def cut(v):
        if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == batch:
            return v[:n]
        if isinstance(v, tuple):
            return tuple(cut(x) for x in v)
        return v

    return {k: cut(v) for k, v in kwargs.items()}


def _record_inputs(layer, x: torch.Tensor, kwargs: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Run ``layer`` and return (its output, {linear name: input activations})."""
    feats: dict[str, torch.Tensor] = {}
    handles = [m.register_forward_hook(lambda _m, args, _o, name=name: feats.__setitem__(name, args[0].detach()))
               for name, m in layer.named_modules() if isinstance(m, nn.Linear)]
    try:
        out = layer(x, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return (out[0] if isinstance(out, tuple) else out), feats


# ---------------------------------------------------------------------------------------------
# Scale and clip search
# ---------------------------------------------------------------------------------------------
def _search_scale(x: torch.Tensor, linears: list[nn.Linear], inspect: Callable[[torch.Tensor], torch.Tensor],
                  group: int, n_grid: int) -> torch.Tensor:
    """The per-input-channel scale minimizing ||inspect(x) with Q(W*s)/s  -  inspect(x) in fp||^2."""
    x_mean = x.abs().reshape(-1, x.shape[-1]).float().mean(0)
    w = torch.cat([m.weight.detach() for m in linears], 0).float()
    wg = w.reshape(w.shape[0], -1, group).abs()
    w_mean = (wg / wg.amax(-1, keepdim=True).clamp(min=1e-8)).reshape(w.shape).mean(0)
    with torch.no_grad():
        reference = inspect(x)
        originals = [m.weight.detach().clone() for m in linears]
        best, best_s = float("inf"), torch.ones_like(x_mean)
        # s = 1 (plain round-to-nearest) is scored first, so the search never does worse than RTN
        # on its own objective; AutoAWQ's grid alone does not contain it.
        candidates = [torch.ones_like(x_mean)]
        for i in range(n_grid):
            alpha = i / n_grid
            s = (x_mean.pow(alpha) / (w_mean.pow(1 - alpha) + 1e-4)).clamp(min=1e-4)
            candidates.append(s / (s.max() * s.min()).sqrt())
        for s in candidates:
            for m, orig in zip(linears, originals):
                m.weight.copy_(fake_quantize(orig * s, group) / s)
            loss = (inspect(x) - reference).float().pow(2).mean().item()
            if loss < best:
                best, best_s = loss, s.clone()
        for m, orig in zip(linears, originals):
            m.weight.copy_(orig)
    return best_s


def _apply_scale(prev: nn.Module, linears: list[nn.Linear], s: torch.Tensor) -> None:
    """Fold s: the previous op's output channels divided by s, the consumers' input columns times s."""
    with torch.no_grad():
        if isinstance(prev, nn.Linear):
            prev.weight.div_(s[:, None].to(prev.weight.dtype))
            if prev.bias is not None:
                prev.bias.div_(s.to(prev.bias.dtype))
        else:  # RMSNorm: y = w * norm(x)
            prev.weight.div_(s.to(prev.weight.dtype))
        for m in linears:
            m.weight.mul_(s[None, :].to(m.weight.dtype))


def _search_clip(w: torch.Tensor, x: torch.Tensor, group: int, n_grid: int = 20, max_shrink: float = 0.5,
                 n_tokens: int = 512, rows_per_batch: int = 64) -> torch.Tensor:
    """Per (row, group) clip value minimizing the group's partial-dot-product error on sampled tokens."""
    x = x.reshape(-1, x.shape[-1]).float()
    x = x[:: max(1, x.shape[0] // n_tokens)][:n_tokens]
    xg = x.reshape(1, x.shape[0], -1, group)  # [1, tokens, groups, g]

    def group_dots(wg: torch.Tensor) -> torch.Tensor:
        # [rows, tokens, groups]: per-group partial dot products as one batched matmul over groups,
        # never the [rows, tokens, groups, g] broadcast (hundreds of MB per candidate on CPU)
        return torch.einsum("tgk,rgk->rtg", xg[0], wg[:, 0])

    out = []
    for w_rows in w.float().split(rows_per_batch, 0):
        wg = w_rows.reshape(w_rows.shape[0], 1, -1, group)  # [rows, 1, groups, g]
        reference = group_dots(wg)
        org_max = wg.abs().amax(-1, keepdim=True)
        best_err = torch.full(org_max.shape, float("inf"), device=org_max.device)
        best_max = org_max.clone()
        for i in range(int(max_shrink * n_grid)):
            max_val = org_max * (1 - i / n_grid)
            clipped = wg.clamp(-max_val, max_val)
            q = fake_quantize(clipped.reshape(w_rows.shape[0], -1), group).reshape(wg.shape)
            err = (group_dots(q) - reference).pow(2).mean(1, keepdim=True)[..., None]
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_max = torch.where(better, max_val, best_max)
        out.append(best_max.reshape(w_rows.shape[0], -1))
    return torch.cat(out, 0)


def _apply_clip(linear: nn.Linear, max_val: torch.Tensor, group: int) -> None:
    with torch.no_grad():
        w = linear.weight
        g = w.reshape(w.shape[0], -1, group)
        lim = max_val[..., None].to(w.dtype)
        w.copy_(torch.maximum(torch.minimum(g, lim), -lim).reshape(w.shape))


# ---------------------------------------------------------------------------------------------
# The whole model
# ---------------------------------------------------------------------------------------------
def _groups(layer) -> list[tuple[nn.Module, list[str], str]]:
    """(previous op, linears it feeds, module whose output the scale search scores)."""
    attn, mlp = layer.self_attn, layer.mlp
    groups = [(layer.input_layernorm, ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], "self_attn")]
    if attn.v_proj.weight.shape == attn.o_proj.weight.shape:  # v -> o only without GQA (rows must line up)
        groups.append((attn.v_proj, ["self_attn.o_proj"], "self_attn.o_proj"))
    groups.append((layer.post_attention_layernorm, ["mlp.gate_proj", "mlp.up_proj"], "mlp"))
    groups.append((mlp.up_proj, ["mlp.down_proj"], "mlp.down_proj"))
    return groups


def quantize_model(model, input_ids: torch.Tensor, group: int, n_grid: int = 20, clip: bool = True,
                   search_tokens: int = 2048, progress: Callable[[int], None] | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """AWQ the decoder layers of ``model`` in place (scales folded, weights clipped, still fp).

    Returns {linear name: {qweight, qzeros, scales}}; the model's linears are left holding the
    dequantized int4 weights, so ``model`` itself computes what the checkpoint will.
    """
    if getattr(model.config, "model_type", None) not in ("llama", "mistral", "qwen2", "qwen3"):
        raise ConfigError(f"format=awq supports llama/mistral/qwen2/qwen3 decoders, not {model.config.model_type!r}")
    model.eval()
    packed: dict[str, dict[str, torch.Tensor]] = {}
    with torch.no_grad():
        x, kwargs = _capture_layer0(model, input_ids)
        batch, seq = input_ids.shape
        n_search = max(1, min(batch, math.ceil(search_tokens / seq)))
        search_kwargs = _slice_batch(kwargs, n_search, batch)
        for i, layer in enumerate(model.model.layers):
            out, feats = _record_inputs(layer, x, kwargs)
            for prev, names, inspect_name in _groups(layer):
                linears = [layer.get_submodule(n) for n in names]
                inspect = layer.get_submodule(inspect_name)
                xs = feats[names[0]][:n_search]
                if inspect_name == "self_attn":
                    def run(h, mod=inspect):
                        return mod(hidden_states=h, **search_kwargs)[0]
                else:
                    run = inspect
                s = _search_scale(xs, linears, run, group, n_grid)
                _apply_scale(prev, linears, s)
                for n in names:
                    feats[n] = feats[n] / s.to(feats[n].dtype)
            for name, m in layer.named_modules():
                if not isinstance(m, nn.Linear):
                    continue
                if clip and not name.endswith(("q_proj", "k_proj")):  # q/k feed a bilinear qk^T: clipping is unreliable
                    _apply_clip(m, _search_clip(m.weight.detach(), feats[name], group), group)
                full = f"model.layers.{i}.{name}"
                packed[full] = pack_linear(m.weight.detach(), group)
                m.weight.copy_(fake_quantize(m.weight.detach(), group))
            x = out  # the fp (pre-quantization) output feeds the next layer's calibration, as in AutoAWQ
            if progress:
                progress(i)
    return packed


def rtn_quantize_(model, group: int) -> None:
    """Round-to-nearest baseline: every decoder linear fake-quantized with the same int4 grid, in place."""
    with torch.no_grad():
        for layer in model.model.layers:
            for m in layer.modules():
                if isinstance(m, nn.Linear):
                    m.weight.copy_(fake_quantize(m.weight.detach(), group))


# ---------------------------------------------------------------------------------------------
# Checkpoint I/O
# ---------------------------------------------------------------------------------------------
def quantization_config(group: int) -> dict:
    return {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True, "version": "gemm",
            "modules_to_not_convert": None}


def save_awq(model, packed: dict[str, dict[str, torch.Tensor]], group: int, out_dir: str | Path) -> None:
    """Write the AWQ checkpoint: quantized linears as qweight/qzeros/scales, the rest fp16."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    state = {}
    for name, t in model.state_dict().items():
        module = name.rsplit(".", 1)[0]
        if module in packed:
            if name.endswith(".bias"):
                state[name] = t.to(torch.float16).contiguous()
            continue
        state[name] = t.to(torch.float16).contiguous()
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    for module, tensors in packed.items():
        for k, v in tensors.items():
            state[f"{module}.{k}"] = v.contiguous()
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    cfg = model.config.to_dict()
    cfg["quantization_config"] = quantization_config(group)
    cfg["dtype"] = cfg["torch_dtype"] = "float16"
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2))


def dequantize_awq_checkpoint(path: str | Path, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """An AWQ GEMM checkpoint dir -> HF-named fp state dict (``<linear>.weight`` [out, in])."""
    from safetensors.torch import load_file

    path = Path(path)
    qcfg = json.loads((path / "config.json").read_text()).get("quantization_config") or {}
    if qcfg.get("quant_method") != "awq" or str(qcfg.get("version", "gemm")).lower() != "gemm" or qcfg.get("bits", 4) != 4:
        raise ValueError(f"{path} is not a 4-bit AWQ GEMM checkpoint (quantization_config={qcfg})")
    group = int(qcfg["group_size"])
    state: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        state.update(load_file(str(f)))
    out = {}
    for name, t in state.items():
        if name.endswith(".qweight"):
            module = name[: -len(".qweight")]
            w = awq_dequant(t, state[f"{module}.qzeros"], state[f"{module}.scales"].float(), group)
            out[f"{module}.weight"] = w.to(dtype)
        elif not name.endswith((".qzeros", ".scales")):
            out[name] = t.to(dtype)
    return out
