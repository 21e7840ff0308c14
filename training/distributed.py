"""The processes of a run: joining the process group torchrun describes, the collectives training
uses (barrier, gather, broadcast from rank 0), and the replica check of ``--debug-replica-checksums``.
With one process every helper is a no-op, so callers never branch on it."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from captioner.api import resolve_device
from captioner.model import CaptionModel
from training.config import TrainConfig


@dataclass(frozen=True)
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0  # the process's index on its own machine

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(tc: TrainConfig) -> tuple[Distributed, torch.device]:
    """Join the process group torchrun describes in the environment (one process per device) and
    pick this process's device; without torchrun, a single process on ``tc.device``."""
    device = resolve_device(tc.device)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Distributed(), device
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=timedelta(minutes=tc.dist_timeout_minutes))
    return Distributed(rank, world_size, local_rank), device


def barrier(d: Distributed) -> None:
    if d.enabled:
        dist.barrier()


def gather(d: Distributed, value: Any) -> list[Any]:
    """Every rank's ``value``, in rank order, on every rank."""
    if not d.enabled:
        return [value]
    values: list[Any] = [None] * d.world_size
    dist.all_gather_object(values, value)
    return values


def broadcast_from_main(d: Distributed, value: Any) -> Any:
    """Rank 0's ``value`` on every rank."""
    if not d.enabled:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def parameter_checksum(model: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def check_replicas(model: CaptionModel, d: Distributed, out: Path) -> None:
    """Debugging aid for DDP: each rank writes its parameters' checksum; any mismatch fails loudly."""
    checksum = parameter_checksum(model)
    (out / f"replica_{d.rank}.txt").write_text(checksum + "\n", encoding="utf-8")
    checksums = gather(d, checksum)
    if len(set(checksums)) != 1:
        raise RuntimeError(f"the model replicas diverged: parameter checksums {checksums}")
