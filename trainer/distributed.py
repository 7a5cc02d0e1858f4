"""Process-group setup and the few collectives the trainer needs."""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def bf16_supported(self) -> bool:
        return self.device.type == "cuda" and torch.cuda.is_bf16_supported()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_distributed() -> DistInfo:
    """Join (or, alone, create) the process group on the accelerator DeepSpeed selected.

    Launchers (deepspeed, torchrun) set RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT; a plain
    ``python -m launch.train`` gets a one-process group on a free local port.
    """
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    accelerator = get_accelerator()
    if accelerator.device_name() == "cpu":
        # Ranks on one host share its cores; oversubscribed threads slow every rank down.
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", world_size)))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local_world)))
        device = torch.device("cpu")
    else:
        accelerator.set_device(local_rank)
        device = torch.device(accelerator.device_name(local_rank))
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    deepspeed.init_distributed(dist_backend=accelerator.communication_backend_name(), verbose=False)
    return DistInfo(rank, local_rank, world_size, device)


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def all_gather_objects(obj) -> list:
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def barrier() -> None:
    dist.barrier()


def destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
