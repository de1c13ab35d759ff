"""The one place that decides a process's device and joins its process group.

Every training program (teacher, ODE pairs, ODE initialisation, distillation) starts with `init()`:
* launched by `deepspeed` or `torchrun` (RANK, LOCAL_RANK, WORLD_SIZE set), it joins their group;
  run as a plain script it makes a group of one on a free local port, so a world of one is the
  ordinary path, not a special case;
* on a CUDA machine the process owns GPU `LOCAL_RANK` (`torch.cuda.set_device`) and the group uses
  NCCL; elsewhere the CPU and gloo;
* a program that ends well leaves the group with `end()` (`hiar.training.main_guard` calls it).

Pipelined inference (hiar/parallel.py) joins the launcher's group with `join_group` and places each
stage with `local_rank_device`.

NCCL only reduces tensors that live on the process's GPU, so every collective here puts its tensor on
`World.device` (a CPU flag handed to NCCL raises at the first call).
"""

from __future__ import annotations

import datetime
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class World:
    rank: int
    size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_solo = False  # whether `init` set this process's launcher variables itself (a group of one)


def init() -> World:
    """Join (or, run as a plain script, create) the process group; returns this process's `World`."""
    import deepspeed

    global _solo
    # a plain single-process run: a group of one on a free local port, a fresh port each time this process
    # makes its group again (`training.main_guard` ends the group when a program ends)
    if "RANK" not in os.environ or (_solo and not torch.distributed.is_initialized()):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
        _solo = True
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)  # before the group exists: NCCL binds each rank to its current device
    else:
        device = torch.device("cpu")
    if not torch.distributed.is_initialized():
        if device.type == "cpu":
            clear_stale_build_lock("deepspeed_shm_comm")
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    return World(torch.distributed.get_rank(), torch.distributed.get_world_size(), local_rank, device)


def end() -> None:
    """Leave the process group before the interpreter exits. Left to interpreter teardown, gloo's worker
    threads can outlive it and abort a process whose work is done ("terminate called without an active
    exception", SIGABRT), and NCCL warns of transfers that may be pending. Through DeepSpeed, which also
    drops the groups it cached (ZeRO's data-parallel group), so a later `init` in this process starts clean."""
    import deepspeed.comm

    if deepspeed.comm.is_initialized():
        deepspeed.comm.destroy_process_group()
    elif torch.distributed.is_initialized():  # a group made without DeepSpeed
        torch.distributed.destroy_process_group()


def join_group(timeout_s: float) -> bool:
    """Join the launcher's process group (NCCL with CUDA, else gloo) unless this process is already in one;
    returns whether this call made it (then it is the caller's to end)."""
    if torch.distributed.is_initialized():
        return False
    backend = "nccl" if torch.cuda.is_available() and not gpus_shared() else "gloo"
    torch.distributed.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return True


def gpus_shared() -> bool:
    """Whether this node runs more processes than it has GPUs (two pipeline stages on one GPU), so that
    processes share a GPU: NCCL refuses two ranks on one device, so their group uses gloo."""
    return torch.cuda.is_available() and int(os.environ.get("LOCAL_WORLD_SIZE", 1)) > torch.cuda.device_count()


def local_rank_device(base: str) -> torch.device:
    """cuda:LOCAL_RANK under a launcher when `base` is cuda, ranks beyond the GPU count sharing them in
    turn (`gpus_shared`); the CPU stays the CPU."""
    if not base.startswith("cuda"):
        return torch.device(base)
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % max(count, 1))


def all_true(flag: bool, device: torch.device) -> bool:
    """Whether `flag` holds on every rank (one MIN all-reduce of a tensor on `device`)."""
    tensor = torch.tensor([float(flag)], device=device)
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MIN)
    return bool(tensor.item())


def clear_stale_build_lock(op: str, stale_after_s: float = 600) -> bool:
    """Remove torch's build lock of a C++ op (DeepSpeed loads its CPU comm op through it at start-up)
    when it is older than any build (about a minute here). A process killed while holding it leaves it
    behind, and every later run would then wait on it forever, silently. Returns whether it removed one."""
    from torch.utils.cpp_extension import _get_build_directory

    lock = Path(_get_build_directory(op, False)) / "lock"
    try:
        if time.time() - lock.stat().st_mtime > stale_after_s:
            lock.unlink()
            print(f"removed a stale build lock {lock} (left by a run killed while loading {op})", file=sys.stderr)
            return True
    except FileNotFoundError:
        pass
    return False
