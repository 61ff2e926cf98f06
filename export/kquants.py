"""ggml K-quants (Q4_K, Q5_K, Q6_K) in vectorized numpy, byte-compatible with llama.cpp.

gguf-py can dequantize K-quants but not produce them, which is why Q4_K_M normally needs a
``llama-quantize`` binary. These are ports of ``quantize_row_q{4,5,6}_K_ref`` from ggml-quants.c
(the path llama.cpp takes without an importance matrix), written over whole tensors at once:
every per-block loop of the C code becomes an axis. Arithmetic stays in float32 and rounding is
round-half-to-even, as in the C code's ``nearest_int`` trick, so the chosen codes match llama.cpp
except for rare float-contraction ties.

Super-block layouts (256 weights each, ``QK_K``):

    Q4_K  d:f16 dmin:f16 scales:12B qs:128B            y = d*sc_j*q - dmin*m_j   (8 sub-blocks of 32)
    Q5_K  d:f16 dmin:f16 scales:12B qh:32B qs:128B     same, q has a 5th bit in qh
    Q6_K  ql:128B qh:64B scales:16 x int8 d:f16        y = d*sc_j*(q - 32)       (16 sub-blocks of 16)
"""
from __future__ import annotations

import numpy as np

QK_K = 256
BLOCK_BYTES = {"Q4_K": 144, "Q5_K": 176, "Q6_K": 210}
_F32 = np.float32
_GROUP_MAX_EPS = _F32(1e-15)


def _nearest(x: np.ndarray) -> np.ndarray:
    return np.rint(x).astype(np.int32)


def _fp16_roundtrip(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).astype(_F32)


def _superblocks(w: np.ndarray) -> np.ndarray:
    w = np.ascontiguousarray(w, dtype=_F32)
    if w.shape[-1] % QK_K:
        raise ValueError(f"K-quants need rows that are a multiple of {QK_K}; got a row of {w.shape[-1]}")
    return w.reshape(-1, QK_K)


# ---------------------------------------------------------------------------------------------
# Scale/min fitting (make_qkx2_quants and make_qx_quants), over the last axis of a batch
# ---------------------------------------------------------------------------------------------
def _fit_scale_min(x: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int):
    """Asymmetric fit y = scale*L - min_ per sub-block, minimizing weighted squared error.

    Starts from the min/max range and tries ``nstep + 1`` stretched ranges, keeping for each the
    least-squares (scale, min) of its codes: the search ggml does, over all sub-blocks at once.
    Errors are expanded into the weighted moments (sum w*l^2, ...) so each candidate costs a few
    passes over the data instead of a second elementwise error pass.
    Returns ``(scale, the_min, L)`` with ``the_min >= 0`` (ggml stores the negated minimum).
    """
    def wsum(a):
        return a.sum(-1, keepdims=True, dtype=_F32)

    weights = np.sqrt((x * x).mean(-1, keepdims=True, dtype=_F32)).astype(_F32) + np.abs(x)
    lo = np.minimum(x.min(-1, keepdims=True), _F32(0))
    hi = x.max(-1, keepdims=True)
    lo0, flat = lo, hi == lo
    sum_w, sum_x, sum_x2 = wsum(weights), wsum(weights * x), wsum(weights * x * x)

    def error(scale, m, sum_l, sum_l2, sum_xl):  # sum w*(scale*l + m - x)^2, expanded
        return (scale * scale * sum_l2 + 2 * scale * m * sum_l - 2 * scale * sum_xl
                + m * m * sum_w - 2 * m * sum_x + sum_x2)

    def codes(iscale):
        L = np.clip(np.rint(iscale * (x - lo)), 0, nmax)
        wl = weights * L
        return L, wsum(wl), wsum(wl * L), wsum(wl * x)

    iscale = _F32(nmax) / np.where(flat, _F32(1), hi - lo)
    scale = _F32(1) / iscale
    L, *moments = codes(iscale)
    best = error(scale, lo, *moments)
    for step in range(nstep + 1):
        # ggml re-centres on the best (scale, min) found so far, so the range moves with it
        iscale = (_F32(rmin) + _F32(rdelta) * _F32(step) + _F32(nmax)) / np.where(flat, _F32(1), hi - lo)
        Laux, sum_l, sum_l2, sum_xl = codes(iscale)
        D = sum_w * sum_l2 - sum_l * sum_l
        ok = D > 0
        D = np.where(ok, D, _F32(1))
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
        positive_min = this_min > 0  # the model only allows y >= 0 at code 0: refit the scale alone
        this_scale = np.where(positive_min, sum_xl / np.where(sum_l2 > 0, sum_l2, _F32(1)), this_scale)
        this_min = np.where(positive_min, _F32(0), this_min)
        better = ok & (error(this_scale, this_min, sum_l, sum_l2, sum_xl) < best)
        L = np.where(better, Laux, L)
        best = np.where(better, error(this_scale, this_min, sum_l, sum_l2, sum_xl), best)
        scale = np.where(better, this_scale, scale)
        lo = np.where(better, this_min, lo)
    scale = np.where(flat, _F32(0), scale).astype(_F32)
    L = np.where(flat, 0, L).astype(np.uint8)
    return scale[..., 0], (-np.where(flat, lo0, lo))[..., 0].astype(_F32), L


def _fit_symmetric(x: np.ndarray, nmax: int):
    """Symmetric fit y = scale*(L - nmax) with x^2 weights (make_qx_quants, rmse_type=1)."""
    imax = np.abs(x).argmax(-1)[..., None]
    vmax = np.take_along_axis(x, imax, -1)
    zero = np.abs(vmax) < _GROUP_MAX_EPS
    vmax = np.where(zero, _F32(1), vmax)
    w = x * x

    def codes(iscale):
        return np.clip(_nearest(iscale * x), -nmax, nmax - 1)

    def sums(l):
        lf = l.astype(_F32)
        return (w * x * lf).sum(-1, keepdims=True, dtype=_F32), (w * lf * lf).sum(-1, keepdims=True, dtype=_F32)

    L = codes(_F32(-nmax) / vmax)
    sumlx, suml2 = sums(L)
    scale = np.where(suml2 > 0, sumlx / np.where(suml2 > 0, suml2, _F32(1)), _F32(0))
    best = scale * sumlx
    for step in [s for s in range(-9, 10) if s]:
        Lc = codes(-(_F32(nmax) + _F32(0.1) * _F32(step)) / vmax)
        sumlx, suml2 = sums(Lc)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        safe = np.where(suml2 > 0, suml2, _F32(1))
        L = np.where(better, Lc, L)
        scale = np.where(better, sumlx / safe, scale)
        best = np.where(better, scale * sumlx, best)
    scale = np.where(zero, _F32(0), scale).astype(_F32)
    L = np.where(zero, 0, L + nmax)
    return scale[..., 0], L


# ---------------------------------------------------------------------------------------------
# Q4_K / Q5_K: 8 sub-blocks of 32 with 6-bit scales and mins
# ---------------------------------------------------------------------------------------------
def _pack_scale_min(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """Eight 6-bit (scale, min) pairs into 12 bytes: sub-blocks 4-7 spill their top bits into bytes 0-7."""
    out = np.zeros((ls.shape[0], 12), np.uint8)
    out[:, 0:4] = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    out[:, 4:8] = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    out[:, 8:12] = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)
    return out


def _quantize_k_asym(w: np.ndarray, nmax: int, rmin: float, nstep: int):
    """Shared part of Q4_K/Q5_K: codes L [nb, 256], fp16 d/dmin [nb], packed scales [nb, 12]."""
    x = _superblocks(w).reshape(-1, 8, 32)
    scales, mins, L = _fit_scale_min(x, nmax, rmin, 0.1, nstep)
    max_scale = np.maximum(scales.max(-1), _F32(0))
    max_min = np.maximum(mins.max(-1), _F32(0))
    inv_scale = np.where(max_scale > 0, _F32(63) / np.where(max_scale > 0, max_scale, 1), _F32(0)).astype(_F32)
    inv_min = np.where(max_min > 0, _F32(63) / np.where(max_min > 0, max_min, 1), _F32(0)).astype(_F32)
    ls = np.minimum(_nearest(inv_scale[:, None] * scales), 63).astype(np.uint8)
    lm = np.minimum(_nearest(inv_min[:, None] * mins), 63).astype(np.uint8)
    d = (max_scale / _F32(63)).astype(np.float16)
    dmin = (max_min / _F32(63)).astype(np.float16)
    # Re-quantize against the rounded 6-bit scales actually stored (the codes must fit those).
    sub_d = d.astype(_F32)[:, None] * ls.astype(_F32)
    sub_m = dmin.astype(_F32)[:, None] * lm.astype(_F32)
    has = sub_d != 0
    requant = np.clip(_nearest((x + sub_m[..., None]) / np.where(has, sub_d, 1)[..., None]), 0, nmax)
    L = np.where(has[..., None], requant, L).reshape(-1, QK_K).astype(np.uint8)
    head = np.concatenate([d.view(np.uint8).reshape(-1, 2), dmin.view(np.uint8).reshape(-1, 2), _pack_scale_min(ls, lm)], 1)
    return L, head


def _nibbles(L: np.ndarray) -> np.ndarray:
    """Per 64 codes: byte l holds code l (low nibble) and code l+32 (high nibble)."""
    c = (L & 0xF).reshape(-1, 4, 2, 32)
    return (c[:, :, 0] | (c[:, :, 1] << 4)).reshape(-1, 128)


def quantize_q4_k(w: np.ndarray) -> np.ndarray:
    """[rows, cols] float -> [rows, cols/256*144] uint8 Q4_K blocks."""
    L, head = _quantize_k_asym(w, 15, -1.0, 20)
    return np.concatenate([head, _nibbles(L)], 1).reshape(*w.shape[:-1], -1)


def quantize_q5_k(w: np.ndarray) -> np.ndarray:
    """[rows, cols] float -> [rows, cols/256*176] uint8 Q5_K blocks."""
    L, head = _quantize_k_asym(w, 31, -0.5, 15)
    high = (L >> 4).reshape(-1, 4, 2, 32)  # bit 2*chunk for code l, bit 2*chunk+1 for code l+32
    shifts = (2 * np.arange(4, dtype=np.uint8))[None, :, None]
    qh = ((high[:, :, 0] << shifts) | (high[:, :, 1] << (shifts + 1))).sum(1, dtype=np.uint8)
    return np.concatenate([head, qh, _nibbles(L)], 1).reshape(*w.shape[:-1], -1)


# ---------------------------------------------------------------------------------------------
# Q6_K: 16 sub-blocks of 16 with int8 scales, symmetric 6-bit codes
# ---------------------------------------------------------------------------------------------
def quantize_q6_k(w: np.ndarray) -> np.ndarray:
    """[rows, cols] float -> [rows, cols/256*210] uint8 Q6_K blocks."""
    x = _superblocks(w).reshape(-1, 16, 16)
    scales, L = _fit_symmetric(x, 32)
    imax = np.abs(scales).argmax(-1)[:, None]
    max_scale = np.take_along_axis(scales, imax, -1)[:, 0]
    empty = np.abs(max_scale) < _GROUP_MAX_EPS
    iscale = np.where(empty, _F32(0), _F32(-128) / np.where(empty, 1, max_scale)).astype(_F32)
    d = np.where(empty, _F32(0), _F32(1) / np.where(empty, 1, iscale)).astype(np.float16)
    sc = np.minimum(_nearest(iscale[:, None] * scales), 127).astype(np.int8)
    sub_d = d.astype(_F32)[:, None] * sc.astype(_F32)
    has = sub_d != 0
    requant = np.clip(_nearest(x / np.where(has, sub_d, 1)[..., None]), -32, 31) + 32
    L = np.where(has[..., None], requant, L)
    L = np.where(empty[:, None, None], 0, L).reshape(-1, 2, 4, 32).astype(np.uint8)  # [nb, half, quarter, 32]
    sc = np.where(empty[:, None], 0, sc).astype(np.int8)
    ql = (L[:, :, 0:2] & 0xF) | ((L[:, :, 2:4] & 0xF) << 4)  # [nb, 2, 2, 32]: codes l|l+64, l+32|l+96
    qh = ((L >> 4) << (2 * np.arange(4, dtype=np.uint8))[None, None, :, None]).sum(2, dtype=np.uint8)
    blocks = np.concatenate([ql.reshape(-1, 128), qh.reshape(-1, 64), sc.view(np.uint8), d.view(np.uint8).reshape(-1, 2)], 1)
    return blocks.reshape(*w.shape[:-1], -1)


# ---------------------------------------------------------------------------------------------
# Dequantization (our own, so tests can check it against gguf-py's)
# ---------------------------------------------------------------------------------------------
def _unpack_scale_min(s: np.ndarray):
    sc = np.concatenate([s[:, 0:4] & 63, (s[:, 8:12] & 0xF) | ((s[:, 0:4] >> 6) << 4)], 1)
    mn = np.concatenate([s[:, 4:8] & 63, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)], 1)
    return sc.astype(_F32), mn.astype(_F32)


def _dequantize_k_asym(b: np.ndarray, codes: np.ndarray) -> np.ndarray:
    d = b[:, 0:2].copy().view(np.float16).astype(_F32)
    dmin = b[:, 2:4].copy().view(np.float16).astype(_F32)
    sc, mn = _unpack_scale_min(b[:, 4:16])
    y = (d * sc)[..., None] * codes.reshape(-1, 8, 32).astype(_F32) - (dmin * mn)[..., None]
    return y.reshape(-1, QK_K)


def _codes_from_nibbles(qs: np.ndarray) -> np.ndarray:
    q = qs.reshape(-1, 4, 1, 32)
    return np.concatenate([q & 0xF, q >> 4], 2).reshape(-1, QK_K)


def dequantize(blocks: np.ndarray, kind: str) -> np.ndarray:
    """uint8 [..., n*BLOCK_BYTES[kind]] -> float32 [..., n*256]."""
    size = BLOCK_BYTES[kind]
    b = np.ascontiguousarray(blocks, dtype=np.uint8).reshape(-1, size)
    if kind == "Q4_K":
        y = _dequantize_k_asym(b, _codes_from_nibbles(b[:, 16:144]))
    elif kind == "Q5_K":
        qh = b[:, 16:48].reshape(-1, 1, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 4, 2, 1)
        high = (qh & 1).reshape(-1, QK_K) << 4
        y = _dequantize_k_asym(b, _codes_from_nibbles(b[:, 48:176]) | high)
    elif kind == "Q6_K":
        ql = b[:, 0:128].reshape(-1, 2, 1, 2, 32)
        low = np.concatenate([ql & 0xF, ql >> 4], 2).reshape(-1, 2, 4, 32)  # quarters: lo ql[:32], lo ql[32:], hi, hi
        high = (b[:, 128:192].reshape(-1, 2, 1, 32) >> (2 * np.arange(4, dtype=np.uint8)).reshape(1, 1, 4, 1)) & 3
        q = (low | (high << 4)).astype(_F32).reshape(-1, 16, 16) - 32
        sc = b[:, 192:208].copy().view(np.int8).astype(_F32)
        d = b[:, 208:210].copy().view(np.float16).astype(_F32)
        y = ((d * sc)[..., None] * q).reshape(-1, QK_K)
    else:
        raise ValueError(f"unknown K-quant {kind!r}; choose one of {sorted(BLOCK_BYTES)}")
    return y.reshape(*blocks.shape[:-1], blocks.shape[-1] // size * QK_K)


QUANTIZERS = {"Q4_K": quantize_q4_k, "Q5_K": quantize_q5_k, "Q6_K": quantize_q6_k}
