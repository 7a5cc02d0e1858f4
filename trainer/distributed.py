"""Process-group setup and the few collectives the trainer needs."""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path

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


def first_host(nodelist: str) -> str:
    """The first host of a SLURM nodelist: ``gpu[003-010,012],cpu1`` -> ``gpu003``."""
    head = re.match(r"([^,\[]*)(\[([^\]]*)\])?", nodelist.strip())
    prefix, ranges = head.group(1), head.group(3)
    return prefix + ranges.split(",")[0].split("-")[0] if ranges else prefix


def _tasks_on_node(tasks_per_node: str, node: int) -> int:
    """Tasks on node ``node`` from SLURM's compressed count list: ``2(x3),1`` -> 2, 2, 2, 1."""
    counts = []
    for item in tasks_per_node.split(","):
        count, _, repeat = item.partition("(x")
        counts += [int(count)] * (int(repeat.rstrip(")")) if repeat else 1)
    return counts[node]


def env_from_slurm(env: dict[str, str]) -> dict[str, str]:
    """RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT for an srun task.

    ``srun`` (one task per GPU) and ``deepspeed --launcher slurm`` (which runs srun) set only SLURM's own
    variables. The batch script itself is not a task (no SLURM_STEP_ID) and gets nothing. MASTER_ADDR and
    MASTER_PORT that the job already exports win (node names need not resolve); otherwise the first node of
    the step and a port derived from the job id, the same on every task.
    """
    if "RANK" in env or "SLURM_STEP_ID" not in env or "SLURM_PROCID" not in env:
        return {}
    node = int(env.get("SLURM_NODEID", 0))
    tasks_per_node = env.get("SLURM_STEP_TASKS_PER_NODE", env.get("SLURM_TASKS_PER_NODE", "1"))
    return {
        "RANK": env["SLURM_PROCID"],
        "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
        "WORLD_SIZE": env.get("SLURM_STEP_NUM_TASKS", env.get("SLURM_NTASKS", "1")),
        "LOCAL_WORLD_SIZE": str(_tasks_on_node(tasks_per_node, node)),
        "MASTER_ADDR": env.get("MASTER_ADDR")
        or first_host(env.get("SLURM_STEP_NODELIST", env.get("SLURM_JOB_NODELIST", "localhost"))),
        "MASTER_PORT": env.get("MASTER_PORT") or str(20000 + int(env.get("SLURM_JOB_ID", 0)) % 20000),
    }


# JIT-compiled by `make install`; loaded by every CPU process. (async_io, only for NVMe offload, needs other
# ops' symbols loaded first, so DeepSpeed keeps loading it.)
PREBUILT_OPS = ("deepspeed_shm_comm",)


def use_prebuilt_ops() -> list[str]:
    """Load DeepSpeed's already-compiled CPU communication op straight from TORCH_EXTENSIONS_DIR.

    DeepSpeed's own path takes the build folder's lock file in every process, even when nothing needs
    building; a process killed in that moment (a preempted or timed-out rank) leaves the lock behind and every
    later run waits for it forever. Loading the built library directly never touches the lock. Ops not built
    yet are left to DeepSpeed. Returns the names loaded here.
    """
    from deepspeed.ops.op_builder.builder import OpBuilder
    from torch.utils.cpp_extension import _get_build_directory

    loaded = []
    for name in PREBUILT_OPS:
        library = Path(_get_build_directory(name, verbose=False)) / f"{name}.so"
        if name in OpBuilder._loaded_ops or not library.is_file():
            continue
        spec = importlib.util.spec_from_file_location(name, library)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        OpBuilder._loaded_ops[name] = module
        loaded.append(name)
    return loaded


def unlink_shm_buffer(rank: int) -> None:
    """Remove the name of this rank's DeepSpeed CPU all-reduce buffer once every rank has mapped it.

    DeepSpeed's CPU comm op maps one 66 MB shared-memory file per rank, named by MASTER_ADDR and
    MASTER_PORT, and never unlinks it: /dev/shm fills run after run, and a later job on the same port
    finds a stale buffer (another job's state) under that name. The mapping lives on after the unlink.
    """
    dist.barrier()  # after this every rank has opened every rank's buffer (DeepSpeed maps them at init)
    pattern = "deepspeed_allreduce_buffer_{}_{}_{}_{}".format(
        os.getuid(), os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", ""), rank
    )
    Path("/dev/shm", pattern).unlink(missing_ok=True)


def init_distributed() -> DistInfo:
    """Join (or, alone, create) the process group on the accelerator DeepSpeed selected.

    Launchers (deepspeed, torchrun) set RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT; srun tasks
    get them from SLURM's variables (``env_from_slurm``); a plain ``python -m launch.train`` gets a
    one-process group on a free local port.
    """
    use_prebuilt_ops()
    os.environ.update(env_from_slurm(dict(os.environ)))
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    accelerator = get_accelerator()
    if accelerator.device_name() == "cpu":
        # Ranks on one host share its cores (SLURM says how many are this task's); oversubscribed threads
        # slow every rank down, by 10x in stalls on a 2-core host.
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", world_size)))
        cpus = int(os.environ.get("SLURM_CPUS_PER_TASK", 0)) or (os.cpu_count() or 1) // max(1, local_world)
        torch.set_num_threads(max(1, cpus))
        device = torch.device("cpu")
    else:
        accelerator.set_device(local_rank)
        device = torch.device(accelerator.device_name(local_rank))
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    deepspeed.init_distributed(dist_backend=accelerator.communication_backend_name(), verbose=False)
    if device.type == "cpu":
        unlink_shm_buffer(rank)
    node = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
    log.info("rank %d of %d (local rank %d) on node %s", rank, world_size, local_rank, node)
    return DistInfo(rank, local_rank, world_size, device)


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def all_gather_objects(obj) -> list:
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj, src: int = 0):
    """``obj`` as rank ``src`` has it, on every rank (other ranks pass anything, e.g. None)."""
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


class _GatherWithGrad(torch.autograd.Function):
    """All ranks' (B, ...) tensors -> (world * B, ...), rank order. Backward sums the gathered gradient over
    ranks and returns this rank's slice: every rank computes the same loss over the whole gathered batch, so
    the sum is world x the gradient for this rank's inputs, and the engine's averaging over ranks makes it
    exactly the gradient of that one loss."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        ctx.rank, ctx.world = dist.get_rank(), dist.get_world_size()
        parts = [torch.empty_like(tensor) for _ in range(ctx.world)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad.chunk(ctx.world)[ctx.rank]


def gather_batch(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's equally shaped (B, ...) tensor along dim 0, differentiably (see above)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return tensor
    return _GatherWithGrad.apply(tensor)


def barrier() -> None:
    dist.barrier()


def destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
