"""Who this process is, read from the environment, so one code path runs under every launcher.

    world = world_info_from_env()        # deepspeed / torchrun: RANK...; srun: SLURM_PROCID...; else one process
    device = pick_device(world, "auto")
    init_distributed(world, device)      # gloo on CPUs, nccl on GPUs; a single process gets a private port

Reading ranks from the environment (not from --local_rank) keeps `main(argv)`
testable in-process and identical under `deepspeed`, `torchrun` and `srun`.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from egmf.errors import ConfigError

logger = logging.getLogger("egmf.train")


@dataclass(frozen=True)
class WorldInfo:
    rank: int
    local_rank: int
    world_size: int

    @property
    def is_logging_rank(self) -> bool:
        return self.rank == 0


def world_info_from_env(env: dict[str, str] | None = None) -> WorldInfo:
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:  # deepspeed, torchrun, torch.distributed.run
        return WorldInfo(int(env["RANK"]), int(env.get("LOCAL_RANK", 0)), int(env["WORLD_SIZE"]))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and "SLURM_STEP_ID" in env:  # one srun task per rank
        return WorldInfo(int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", 0)), int(env["SLURM_NTASKS"]))
    return WorldInfo(0, 0, 1)


def check_rendezvous(world: WorldInfo) -> None:
    """Several ranks need a rendezvous address, which every launcher sets; a bare `python` of rank 1 has none."""
    if world.world_size > 1 and "MASTER_ADDR" not in os.environ:
        raise ConfigError(
            f"rank {world.rank} of {world.world_size}: MASTER_ADDR is not set; launch with deepspeed, torchrun "
            "or slurm/train_egmf.sh, which set the rendezvous address"
        )


def pick_device(world: WorldInfo, choice: str) -> torch.device:
    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("train.device is 'cuda' but torch sees no CUDA device; use train.device=auto or cpu")
    device = torch.device("cuda", world.local_rank % torch.cuda.device_count())
    torch.cuda.set_device(device)
    return device


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(world: WorldInfo, device: torch.device, timeout_s: int = 1800) -> None:
    """Start the process group (also for one process: DeepSpeed needs one). A collective that waits longer
    than `timeout_s` raises (gloo) or aborts the rank (NCCL with TORCH_NCCL_ASYNC_ERROR_HANDLING)."""
    import deepspeed

    env = {"RANK": world.rank, "LOCAL_RANK": world.local_rank, "WORLD_SIZE": world.world_size}
    check_rendezvous(world)
    if world.world_size == 1:
        env |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": free_port()}
    for key, value in env.items():
        if key not in os.environ:  # a launcher's values win; ours are taken back by close_distributed
            os.environ[key] = str(value)
            _env_set_here.append(key)
    # DeepSpeed creates its data-parallel groups with new_group(ranks) and no timeout, which torch fills in
    # with its module defaults (30 min gloo, 10 min NCCL), not ours: set those, so every group times out alike.
    if device.type == "cpu" and world.is_logging_rank:
        announce_cpu_comm_build()
    timeout = datetime.timedelta(seconds=timeout_s)
    dist.distributed_c10d.default_pg_timeout = timeout
    dist.distributed_c10d.default_pg_nccl_timeout = timeout
    deepspeed.init_distributed(
        dist_backend="nccl" if device.type == "cuda" else "gloo",
        auto_mpi_discovery=False,
        timeout=timeout,
        verbose=False,
    )
    if device.type == "cpu":
        unlink_cpu_allreduce_buffer(world)


CPU_COMM_OP = "deepspeed_shm_comm"
"""The shared-memory op DeepSpeed JIT-compiles for CPU collectives, once per build cache (TORCH_EXTENSIONS_DIR)."""


def announce_cpu_comm_build() -> None:
    """Say so before DeepSpeed compiles its CPU communication op: a minute or more of silence otherwise. It is
    built once per TORCH_EXTENSIONS_DIR (slurm/env.sh keeps one per environment, so requeued jobs reuse it)."""
    from torch.utils.cpp_extension import _get_build_directory

    folder = _get_build_directory(CPU_COMM_OP, verbose=False)
    if not any(name.endswith(".so") for name in (os.listdir(folder) if os.path.isdir(folder) else [])):
        logger.info(
            "building DeepSpeed's CPU communication op (%s) in %s: once per environment, about a minute",
            CPU_COMM_OP,
            folder,
        )


def cpu_allreduce_buffer_path(rank: int) -> str:
    """Where DeepSpeed's CPU all-reduce keeps this rank's shared-memory workspace (about 70 MB). It creates one
    per rank when every rank is on one node (the deepspeed launcher's LOCAL_SIZE equals the world size), names
    it after the rendezvous address, and never unlinks it."""
    address, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{address}_{port}_{rank}"


def unlink_cpu_allreduce_buffer(world: WorldInfo) -> None:
    """Unlink this rank's workspace as soon as every rank has mapped every other's: the mappings stay valid
    for the run, and the memory returns to the system when the last rank exits, however it exits. Left in
    /dev/shm, each run would keep world_size x 70 MB of RAM until the machine reboots."""
    barrier()  # DeepSpeed's initialize returns once this rank has opened all its peers' workspaces
    try:
        os.unlink(cpu_allreduce_buffer_path(world.rank))
    except FileNotFoundError:  # not created: ranks on several nodes, or a launcher without LOCAL_SIZE
        pass


def close_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
    while _env_set_here:
        os.environ.pop(_env_set_here.pop(), None)


_env_set_here: list[str] = []


def node_name() -> str:
    """This node's name: Slurm's name for it inside a job (several slurmd may share one host), else the host's."""
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


def host_names(world: WorldInfo) -> list[str]:
    """Node name of every rank (a collective: call it on all ranks)."""
    names = [None] * world.world_size
    dist.all_gather_object(names, node_name())
    return names


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
