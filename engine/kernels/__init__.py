"""Triton kernels of the GPU path (checked against the torch reference under TRITON_INTERPRET=1).

Programmatic dependent launch (PDL): on Hopper and newer, a kernel launched with ``launch_pdl=True``
may start while the kernel before it on the stream is still running, so its launch latency and
ramp-up overlap the predecessor's tail (a batch-1 decode step is a few hundred kernels of a few
microseconds each, where that tail is a large share). Every kernel taking ``USE_PDL`` keeps the contract:

- ``gdc_launch_dependents()`` first, so the next kernel's programs can be scheduled early (they
  only start once every program of this grid has triggered or exited: no starvation);
- before ``gdc_wait()`` only reads of data no kernel of the step writes (weights, norm weights, RoPE
  tables, biases) and no writes at all; every program calls ``gdc_wait()`` unconditionally, so a
  grid never completes before its predecessor has, and the chain stays ordered transitively.
- one exception, by construction: the first layer's qkv GEMV triggers late (``gemv(late_trigger=True)``:
  after its own ``gdc_wait``). A kernel starts only once its predecessor has triggered, so when any
  later kernel of the step starts, that GEMV has passed its wait and every kernel before it has
  completed (the previous steps, the input advance; kernels without PDL order themselves). The decode
  attention (``EARLY_KV``) therefore reads the step's lengths, block tables and cached K/V before its
  ``gdc_wait`` (through L2) and waits only for its qkv rows.

The switch is process-wide and read at launch time by every wrapper: a CUDA graph keeps the launch
attributes it was captured with, so the model runner recaptures its graphs after ``set_pdl``.
This module imports Triton only for a CUDA device: the CPU path imports it too.
"""
from __future__ import annotations

import functools

import torch

_pdl_enabled = True


def pdl_supported(device: torch.device | str) -> bool:
    """CUDA with compute capability >= 9 (Hopper's griddepcontrol), and not the Triton interpreter."""
    device = torch.device(device)
    if device.type != "cuda":
        return False
    return _cuda_pdl_supported(device.index if device.index is not None else torch.cuda.current_device())


def set_pdl(enabled: bool) -> None:
    """Turn PDL on or off for kernels launched from now on (on: where ``pdl_supported``)."""
    global _pdl_enabled
    _pdl_enabled = bool(enabled)


def use_pdl(device: torch.device | str) -> bool:
    """What a wrapper passes as ``USE_PDL`` / ``launch_pdl`` for a kernel on ``device``."""
    return _pdl_enabled and pdl_supported(device)


@functools.lru_cache(maxsize=None)  # asked at every launch; fixed for the process
def _cuda_pdl_supported(index: int) -> bool:
    import triton  # only for a CUDA device, where the kernels import Triton anyway

    return not triton.knobs.runtime.interpret and torch.cuda.get_device_capability(index) >= (9, 0)
