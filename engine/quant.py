"""AWQ int4 projections for the engine: the checkpoint's packed weights stay packed on the device.

``engine.loader.load_checkpoint`` swaps every ``engine.layers.Linear`` whose HF parts an AutoAWQ
GEMM checkpoint stores as ``qweight``/``qzeros``/``scales`` for an ``AWQLinear`` before any weight
is read. Fused projections (q/k/v, gate/up) concatenate their parts along the output columns, as
the fp weights do; ``shard`` hands the loader each part's column slice of the packed tensors.

Forward:
  * CUDA: ``export.awq_triton.awq_gemm`` (fused split-K int4 kernel at decode, Triton dequantize +
    cuBLAS for prefill-sized batches); weights are read as int4, ~3.5x fewer bytes than bf16.
  * CPU: the weight is dequantized once per compute dtype and cached, then ``F.linear``; the values
    are exactly those of the dequantized checkpoint, so this path is the numerical reference.
The multi-LoRA ``adapter`` hook runs after the base projection, as in ``Linear``.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from engine.context import get_context
from engine.layers import Linear

PACKED_LEAVES = ("qweight", "qzeros", "scales")


def awq_group_size(path: str | Path) -> int | None:
    """The group size of an AWQ checkpoint directory, None for any other checkpoint.

    Only the layout we can execute is accepted: 4-bit, zero-point, GEMM packing (AutoAWQ's default,
    what ``launch/export.py format=awq`` writes)."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        return None
    qcfg = json.loads(config_file.read_text()).get("quantization_config") or {}
    if qcfg.get("quant_method") != "awq":
        return None
    layout = (qcfg.get("bits", 4), str(qcfg.get("version", "gemm")).lower(), qcfg.get("zero_point", True))
    if layout != (4, "gemm", True):
        raise ValueError(f"{path}: quantization_config bits={layout[0]} version={layout[1]} zero_point={layout[2]} "
                         "is not supported; the engine runs 4-bit zero-point AWQ in the GEMM layout")
    return int(qcfg["group_size"])


class AWQLinear(Linear):
    """A ``Linear`` whose weight is AWQ int4: ``qweight`` int32 [in, out/8], ``qzeros`` int32
    [in/g, out/8], ``scales`` fp16 [in/g, out] (buffers, so the parameter list stays the fp part)."""

    def __init__(self, in_features: int, out_features: int, group: int, bias: bool, output_sizes: list[int],
                 dtype: torch.dtype, device: torch.device | str | None = None):
        nn.Module.__init__(self)  # not Linear.__init__: no [out, in] fp weight is ever allocated
        bad = [n for n in output_sizes if n % 8]
        if bad or in_features % group:
            raise ValueError(f"AWQ needs output sizes divisible by 8 (got {output_sizes}) and in_features {in_features} "
                             f"divisible by the group size {group}")
        self.in_features, self.out_features, self.output_sizes = in_features, out_features, list(output_sizes)
        self.group, self.dtype = group, dtype
        self.register_buffer("qweight", torch.zeros(in_features, out_features // 8, dtype=torch.int32, device=device))
        self.register_buffer("qzeros", torch.zeros(in_features // group, out_features // 8, dtype=torch.int32, device=device))
        self.register_buffer("scales", torch.zeros(in_features // group, out_features, dtype=torch.float16, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False) if bias else None
        self.adapter = None
        self.gemv = None  # Linear's fp GEMV plan: never set here (the runner tunes plain Linear modules only)
        self.backend = "auto"  # auto (Triton on CUDA, torch elsewhere) | torch | triton (tests: Triton's CPU interpreter)
        self._dense: tuple[torch.dtype, torch.Tensor] | None = None

    @classmethod
    def replacing(cls, linear: Linear, group: int) -> "AWQLinear":
        """An empty AWQLinear with ``linear``'s shape, bias, fused parts, dtype and device."""
        w = linear.weight
        return cls(linear.in_features, linear.out_features, group, linear.bias is not None, linear.output_sizes,
                   w.dtype, w.device)

    def shard(self, tensor: torch.Tensor, part: int) -> torch.Tensor:
        """Fused part ``part`` of a packed tensor (its output columns) or of the bias (its rows)."""
        start, size = sum(self.output_sizes[:part]), self.output_sizes[part]
        if tensor is self.qweight or tensor is self.qzeros:
            return tensor.narrow(1, start // 8, size // 8)
        if tensor is self.scales:
            return tensor.narrow(1, start, size)
        return super().shard(tensor, part)

    def dense_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The dequantized [out, in] weight in ``dtype`` (cached off-GPU, where it is the forward path)."""
        if self._dense is not None and self._dense[0] == dtype:
            return self._dense[1]
        from export.awq import awq_dequant

        w = awq_dequant(self.qweight, self.qzeros, self.scales.float(), self.group).to(dtype)
        if w.device.type != "cuda":
            self._dense = (dtype, w)
        return w

    @property
    def weight(self) -> torch.Tensor:
        """The effective fp weight, for code that reads ``Linear.weight`` (LoRA slot shapes, logits of a
        quantized head); the forward never materializes it on GPU."""
        return self.dense_weight(self.dtype)

    def packed_changed(self) -> None:
        """Drop the dequantized cache after the packed tensors were (re)written."""
        self._dense = None

    def _use_triton(self, x: torch.Tensor) -> bool:
        return self.backend == "triton" or (self.backend == "auto" and x.is_cuda)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._use_triton(x):
            from export.awq_triton import awq_gemm

            y = awq_gemm(x, self.qweight, self.qzeros, self.scales, self.group)
            if self.bias is not None:
                y = y + self.bias
        else:
            y = F.linear(x, self.dense_weight(x.dtype), self.bias)
        if self.adapter is not None:
            y = self.adapter(x, y, get_context().adapter_ids)
        return y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int4 group={self.group}"
