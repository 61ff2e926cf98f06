"""Triton kernels of the GPU path (checked against the torch reference under TRITON_INTERPRET=1)."""
