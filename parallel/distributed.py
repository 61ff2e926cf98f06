"""What every multi-process strategy shares: the process group, collectives that fail fast, and
checks that the launcher and the config agree.

Launch with plain ``torchrun`` (c10d rendezvous); NCCL on GPUs, gloo on CPU. Every collective
carries ``parallel.timeout_s``; a timeout is re-raised naming this rank and the collective, so a
hung or crashed peer shows up as one clear line instead of a silent hang.
"""
from __future__ import annotations

import contextlib
import os
from datetime import timedelta
from typing import Any, Iterator

import torch
import torch.distributed as dist

from parallel.base import Strategy


class CollectiveTimeoutError(RuntimeError):
    pass


class DistributedStrategy(Strategy):
    """Base for ddp / fsdp2 / zero*: one process per device, started by torchrun."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.loss_scale = float(self.world_size)

    @property
    def backend(self) -> str:
        return "nccl" if self.device.type == "cuda" else "gloo"

    def setup(self) -> None:
        super().setup()
        if "RANK" not in os.environ and self.world_size == 1:
            # a plain `python launch/train.py` with a sharded strategy: one rank, its own group
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
        if not dist.is_initialized():
            kwargs: dict[str, Any] = {"timeout": timedelta(seconds=self.cfg.parallel.timeout_s)}
            if self.device.type == "cuda":
                kwargs["device_id"] = self.device  # eager NCCL init: a bad GPU fails here, not mid-step
            dist.init_process_group(self.backend, rank=self.rank, world_size=self.world_size, **kwargs)
        if dist.get_world_size() != self.world_size:
            raise RuntimeError(f"rank {self.rank}: WORLD_SIZE={self.world_size} but the process group has {dist.get_world_size()} ranks")
        if self.device.type == "cuda" and torch.cuda.device_count() <= self.local_rank:
            raise RuntimeError(f"rank {self.rank}: LOCAL_RANK={self.local_rank} but this node has {torch.cuda.device_count()} GPUs; "
                               "--nproc_per_node must not exceed the GPUs per node")

    def teardown(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()

    @contextlib.contextmanager
    def _collective(self, name: str) -> Iterator[None]:
        try:
            yield
        except (RuntimeError, dist.DistBackendError) as e:
            if "timeout" in str(e).lower() or "timed out" in str(e).lower():
                raise CollectiveTimeoutError(
                    f"rank {self.rank}/{self.world_size}: {name} timed out after parallel.timeout_s={self.cfg.parallel.timeout_s}s; "
                    "another rank crashed or is stuck (see its log)"
                ) from None
            raise

    @property
    def comm_device(self) -> torch.device:
        return self.device if self.backend == "nccl" else torch.device("cpu")

    def all_reduce_sum(self, value: torch.Tensor | float) -> torch.Tensor:
        t = torch.as_tensor(value, dtype=torch.float64).to(self.comm_device).clone()
        with self._collective("all_reduce"):
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.cpu()

    def all_reduce_min(self, value: int | float) -> float:
        t = torch.tensor(float(value), dtype=torch.float64, device=self.comm_device)
        with self._collective("all_reduce_min"):
            dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return float(t)

    def broadcast_object(self, obj: Any) -> Any:
        box = [obj]
        with self._collective("broadcast_object"):
            dist.broadcast_object_list(box, src=0, device=self.comm_device)
        return box[0]

    def barrier(self) -> None:
        with self._collective("barrier"):
            if self.backend == "nccl":
                dist.barrier(device_ids=[self.device.index])
            else:
                dist.barrier()

