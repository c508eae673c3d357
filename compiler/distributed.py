"""The processes of one compile: `torchrun --nproc-per-node N -m slimc compile ...` (or `slimc compile --nproc N`,
which starts torchrun) runs N of them under torch.distributed; one process is the world `SINGLE`.

Every process loads the model and runs every block; the calibration batches are split among them (batch i on
rank i % N), so each statistic a pass computes from batches is reduced here before anything is chosen from it.
Code written for one process calls the same methods: on `SINGLE` they return their argument.
"""

from __future__ import annotations

import datetime
import os
from typing import Any

import torch

from slimc.errors import SlimcError

BACKENDS = {"cpu": "gloo", "cuda": "nccl", "npu": "hccl"}
# How long a process waits in a collective: the others wait while the first writes every output (hours for the
# largest models), and a failed process is noticed without it (its connections close; torchrun ends the rest).
TIMEOUT = datetime.timedelta(hours=24)


class PeerFailed(SlimcError):
    """Another process of the compile stopped; it printed why."""


class World:
    """This process's rank among `size` processes, and the collectives the passes reduce their statistics with."""

    def __init__(self, rank: int = 0, size: int = 1, device: torch.device | None = None) -> None:
        self.rank = rank
        self.size = size
        self.device = device or torch.device("cpu")  # where collectives of this backend take their tensors

    @property
    def is_leader(self) -> bool:
        """The process that writes the outputs."""
        return self.rank == 0

    def max(self, value: torch.Tensor) -> torch.Tensor:
        return self._all_reduce(value, "MAX")

    def min(self, value: torch.Tensor) -> torch.Tensor:
        return self._all_reduce(value, "MIN")

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        return self._all_reduce(value, "SUM")

    def worst(self, values: list[float]) -> float:
        """The largest of every process's `values` (errors, which are >= 0; 0.0 where no process has any)."""
        local = max(values, default=0.0)
        if self.size == 1:
            return local
        return float(self.max(torch.tensor(local, dtype=torch.float64)))

    def gather(self, value: Any) -> list[Any]:
        """Every process's `value` (picklable), in rank order."""
        if self.size == 1:
            return [value]
        gathered: list[Any] = [None] * self.size
        self._collective(torch.distributed.all_gather_object, gathered, value)
        return gathered

    def broadcast(self, value: Any, source: int = 0) -> Any:
        """Rank `source`'s `value` (picklable), on every process."""
        if self.size == 1:
            return value
        box = [value]
        self._collective(torch.distributed.broadcast_object_list, box, src=source)
        return box[0]

    def barrier(self) -> None:
        if self.size > 1:
            self._collective(torch.distributed.barrier)

    def _all_reduce(self, value: torch.Tensor, op: str) -> torch.Tensor:
        if self.size == 1:
            return value
        reduced = value.detach().to(self.device, copy=True)
        self._collective(torch.distributed.all_reduce, reduced, op=getattr(torch.distributed.ReduceOp, op))
        return reduced.to(value.device)

    def _collective(self, function, *args, **kwargs) -> None:
        try:
            function(*args, **kwargs)
        except RuntimeError as error:  # a peer that raised has exited, and its connections closed
            raise PeerFailed(f"another of the {self.size} processes of the compile stopped (its message says why); "
                             "this one stops too") from error


SINGLE = World()


def launched() -> bool:
    """Whether torchrun started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def join(device: str) -> World:
    """This process's world: `SINGLE` unless torchrun started several, then the process group over the backend of
    `device` (gloo for cpu, nccl for cuda, hccl for npu), each process on its own accelerator."""
    if not launched():
        return SINGLE
    kind = device.split(":", 1)[0]
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if kind == "npu":
        import torch_npu  # noqa: F401  (registers torch.npu and the hccl backend)
    accelerator = torch.device("cpu") if kind == "cpu" else torch.device(kind, local_rank)
    if kind == "cuda":
        torch.cuda.set_device(accelerator)
    elif kind == "npu":
        torch.npu.set_device(accelerator)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(BACKENDS[kind], timeout=TIMEOUT)
    return World(torch.distributed.get_rank(), torch.distributed.get_world_size(), accelerator)


def local_device(device: str, world: World) -> str:
    """The device this process works on: `cuda` and `npu` (without an index) become its own accelerator."""
    return str(world.device) if world.size > 1 and ":" not in device and device != "cpu" else device
