"""Pipelined step-first inference across processes (the process group itself is set up by hiar/distributed.py).

Step-first cell (n, j) depends on (n, j-1) and on (m < n, j), so the S steps form a pipeline (docs/design.md,
section 1): stage r owns a contiguous group of steps and the KV caches of those steps only. For every
block, stage r receives the block's latent from stage r-1 (the first stage draws the block's noise
instead), runs its cells, and sends the result on with a non-blocking send. The cache writes of its
cells are deferred by the cell runner until the next block reads that cache, so each send leaves
before its block's cache writes run: the next stage starts while this one writes. Cells draw their
noise from the shared pure-function `CellNoise`, so the video is bit-identical to the sequential
run for any number of stages. The last stage yields finished blocks (streaming).

Failures: any stage that fails records "rank r: why" in the process group's store; a stage whose
neighbour vanishes (gloo reports a closed connection at once) records that rank, and every stage
stops with the first recorded root cause instead of waiting for a collective timeout. A stage sent
SIGTERM records, when no cause is recorded yet, the rank whose process is already gone (torchrun
terminates the others after one dies), or else itself (it was stopped from outside), then exits, so
its neighbours stop within seconds naming it.
"""

from __future__ import annotations

import os
import signal
import socket
from collections import deque

import torch
import torch.distributed as dist

from hiar import distributed
from hiar.sampling import Blocks, CellRunner

FAILED_KEY = "hiar/pipeline_failed"
PID_KEY = "hiar/stage_pid/{}"  # "host pid" of each rank, for telling a dead stage from a live one


class PipelineError(RuntimeError):
    """The pipeline stopped because a stage failed; the message names the failed rank."""


def stage_steps(num_steps: int, num_stages: int) -> list[range]:
    """Split steps 0..S-1 into `num_stages` contiguous groups, sizes differing by at most one."""
    if not 1 <= num_stages <= num_steps:
        raise ValueError(f"a pipeline of {num_stages} stages needs 1 to {num_steps} stages: one stage runs at "
                         f"least one of the {num_steps} denoising steps; use --nproc_per_node <= {num_steps}")
    base, extra = divmod(num_steps, num_stages)
    bounds = [0]
    for r in range(num_stages):
        bounds.append(bounds[-1] + base + (1 if r < extra else 0))
    return [range(a, b) for a, b in zip(bounds, bounds[1:])]


class StageGroup:
    """This process's place in the pipeline: rank, neighbours, steps, and the messaging between them."""

    def __init__(self, num_steps: int, timeout_s: float = 600.0):
        self._owns_group = distributed.join_group(timeout_s)  # a group the caller made is the caller's to end
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.steps = stage_steps(num_steps, self.world)[self.rank]
        self.is_first, self.is_last = self.rank == 0, self.rank == self.world - 1
        # gloo sends host tensors only: CUDA stages sharing a GPU (hiar.distributed.gpus_shared) pass
        # their blocks through host memory; NCCL sends them from device to device.
        self._wire = torch.device("cpu") if dist.get_backend() == "gloo" else None
        # Private but stable: the rendezvous store every rank shares (hosted by torchrun's agent).
        self._store = dist.distributed_c10d._get_default_store()
        self._store.set(PID_KEY.format(self.rank), f"{socket.gethostname()} {os.getpid()}")
        signal.signal(signal.SIGTERM, self._on_sigterm)

    # -- failure bookkeeping ------------------------------------------------------------------------

    def _root_cause(self, fallback: str) -> str:
        try:
            if self._store.check([FAILED_KEY]):
                return self._store.get(FAILED_KEY).decode()
            self._store.compare_set(FAILED_KEY, "", fallback)
            return self._store.get(FAILED_KEY).decode()
        except PipelineError:  # SIGTERM landed mid-read: its handler's error already names the recorded cause
            raise
        except Exception:  # the store went down with its host: say what this stage knows
            return fallback

    def fail(self, err: BaseException, peer: int | None) -> PipelineError:
        """Record the root cause and return the error this stage stops with."""
        if peer is None:
            cause = self._root_cause(f"rank {self.rank} ({type(err).__name__}: {err})")
        else:
            cause = self._root_cause(f"rank {peer} (its connection closed: it crashed or was killed)")
        return PipelineError(f"pipeline stage {self.rank} stopped: {cause} failed")

    def _on_sigterm(self, signum, frame) -> None:
        # torchrun terminates the other workers when one fails; say why before going. Raising also ends
        # this process, which closes its connections: the neighbours notice and read the cause recorded.
        raise PipelineError(f"pipeline stage {self.rank} stopped: {self._root_cause(self._sigterm_cause())} failed")

    def _sigterm_cause(self) -> str:
        """Who to blame for a SIGTERM when no stage has said yet: a rank whose process is gone (torchrun
        stops the rest after one dies), else this one when every stage runs here and lives (the signal came
        from outside), else nobody known."""
        host, everyone_here = socket.gethostname(), True
        for rank in (r for r in range(self.world) if r != self.rank):
            where = self._stage_process(rank)
            if where is None or where[0] != host:
                everyone_here = False
            elif not _alive(where[1]):
                return f"rank {rank} (its process ended)"
        if everyone_here:
            return f"rank {self.rank} (it was sent SIGTERM)"
        return "another stage (see the launcher summary)"

    def _stage_process(self, rank: int) -> tuple[str, int] | None:
        """(host, pid) that `rank` registered, or None when unknown."""
        key = PID_KEY.format(rank)
        try:
            if not self._store.check([key]):  # get() would wait for the key
                return None
            host, pid = self._store.get(key).decode().split()
        except Exception:  # the store went down with its host
            return None
        return host, int(pid)

    # -- messaging -----------------------------------------------------------------------------------

    def recv(self, like: torch.Tensor) -> torch.Tensor:
        buf = torch.empty_like(like, device=self._wire or like.device)
        try:
            dist.recv(buf, self.rank - 1)
        except RuntimeError as err:
            raise self.fail(err, peer=self.rank - 1) from err
        return buf.to(like.device)

    def isend(self, x: torch.Tensor) -> dist.Work:
        try:
            return dist.isend(x.to(self._wire or x.device).contiguous(), self.rank + 1)
        except RuntimeError as err:
            raise self.fail(err, peer=self.rank + 1) from err

    def wait(self, work: dist.Work) -> None:
        try:
            work.wait()
        except RuntimeError as err:
            raise self.fail(err, peer=self.rank + 1) from err

    def send_to_first(self, values: list[float]) -> list[float] | None:
        """Carry a few numbers from the last stage to rank 0 (reports); others get None."""
        if self.world == 1:
            return values
        buf = torch.tensor(values, dtype=torch.float64)
        if self.is_last:
            dist.send(buf, 0)
        elif self.is_first:
            dist.recv(buf, self.world - 1)
            return buf.tolist()
        return None

    def barrier(self) -> None:
        dist.barrier()

    def close(self) -> None:
        if self._owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _alive(pid: int) -> bool:
    """Whether a process of this host runs (a zombie, dead but not yet reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True  # no /proc: signal 0 is all there is


def pipeline_stage(runner: CellRunner, group: StageGroup, num_blocks: int) -> Blocks:
    """This stage's share of a step-first generation. The last stage yields (block, clean latents)."""
    contexts = {j: runner.new_context() for j in group.steps}
    sends: deque = deque()
    template = runner.noise.initial(0)  # shape and dtype of a block's latent, for receiving
    for n in range(num_blocks):
        x = runner.noise.initial(n) if group.is_first else group.recv(template)
        try:
            for j in group.steps:
                _, x = runner.cell(contexts[j], n, j, x, runner.context_level(j))
        except Exception as err:
            raise group.fail(err, peer=None) from err
        if group.is_last:
            yield n, x
        else:
            sends.append(group.isend(x))
            while len(sends) > 2:  # bound the tensors in flight
                group.wait(sends.popleft())
    for work in sends:
        group.wait(work)
