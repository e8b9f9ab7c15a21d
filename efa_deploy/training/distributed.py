"""Where training runs: the device (auto, cpu, cuda) and the processes of a data-parallel run
under torchrun (WORLD_SIZE, RANK, LOCAL_RANK in the environment).

Every rank holds the whole model and takes a contiguous shard of each global batch; the
gradients, loss terms and counts of a step are summed over ranks in one all_reduce, so every
rank takes the same optimiser step. Failures: each step sums an error flag over the ranks (in
the same collective), so an exception on one rank ends every rank with that rank's message
(RankFailed) instead of leaving the others waiting; torchrun ends the job when any rank exits
with an error.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

# test hook: "RANK:STEP" raises on that rank before that step's forward pass
FAIL_ENV = "EFA_TEST_FAIL_AT"


class RankFailed(RuntimeError):
    """Another rank of a data-parallel run raised; the message is that rank's."""


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def shard(self, indices: np.ndarray) -> np.ndarray:
        """This rank's contiguous part of a global batch (np.array_split: sizes differ by at most one)."""
        return np.array_split(np.asarray(indices), self.size)[self.rank]


def world_from_env() -> World:
    """The process's place in a torchrun job (one process without torchrun)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    return World(int(os.environ.get("RANK", "0")), size, int(os.environ.get("LOCAL_RANK", "0"))) if size > 1 else World()


def resolve_device(name: str, world: World) -> torch.device:
    """auto: a GPU when torch sees one, else the CPU; under torchrun each rank takes the GPU of its local rank."""
    if name not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {name!r}")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError("device cuda: torch sees no GPU (a CPU build of torch, or no visible device); "
                         "use --device cpu or auto")
    device = torch.device("cuda", world.local_rank % torch.cuda.device_count())
    torch.cuda.set_device(device)
    return device


def init(world: World, device: torch.device, timeout_s: float = 600.0) -> None:
    """Join the process group of a torchrun job (gloo on the CPU, nccl on GPUs); no-op for one process."""
    if world.size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=world.rank, world_size=world.size,
                                timeout=datetime.timedelta(seconds=timeout_s))


def all_reduce(buffer: torch.Tensor, world: World) -> torch.Tensor:
    """buffer summed over the ranks, in place."""
    if world.size > 1:
        dist.all_reduce(buffer)
    return buffer


def agree(buffer: torch.Tensor, world: World, error: BaseException | None, flag_index: int = -1) -> torch.Tensor:
    """all_reduce a step's buffer whose element flag_index this rank sets to 1 when it failed
    (`error`); when any rank failed every rank raises (its own error, or RankFailed with the
    message of the lowest failed rank)."""
    if error is not None:
        buffer.zero_()
        buffer[flag_index] = 1.0
    all_reduce(buffer, world)
    if world.size > 1 and float(buffer[flag_index]) > 0:
        messages = [None] * world.size
        dist.all_gather_object(messages, None if error is None else f"{type(error).__name__}: {error}")
        if error is not None:
            raise error
        rank = next(r for r, m in enumerate(messages) if m is not None)
        raise RankFailed(f"rank {rank} failed: {messages[rank]}")
    if error is not None:
        raise error
    return buffer


def broadcast_flag(value: bool, world: World) -> bool:
    """Rank 0's value on every rank."""
    if world.size == 1:
        return value
    flag = torch.tensor([float(value)])
    dist.broadcast(flag, 0)
    return bool(flag.item())


def injected_failure(world: World, step: int) -> None:
    """The test hook EFA_TEST_FAIL_AT=RANK:STEP."""
    spec = os.environ.get(FAIL_ENV)
    if spec and spec == f"{world.rank}:{step}":
        raise RuntimeError(f"injected failure on rank {world.rank} at step {step} ({FAIL_ENV})")


def finish(world: World) -> None:
    if world.size > 1 and dist.is_initialized():
        dist.destroy_process_group()
