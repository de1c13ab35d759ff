"""The training loop every train/ program shares, on DeepSpeed (CPU with gloo works, as does the launcher).

A program supplies a step function `step_fn(step) -> metrics` that computes its losses and hands them
to `Trainer.optimize`; the `Trainer` owns everything else: the DeepSpeed engines (ZeRO stage and
offload from `train.deepspeed`; batch size, clipping and precision from the config), a torch AdamW (no
C++ op build), the learning-rate schedule (warm-up, optional decay), a progress bar, logging to stdout
and optionally wandb (offline by default), atomic checkpoints, `--resume`, SIGTERM handling and the
non-finite-loss guard.

Reproducibility: the random state of step s on rank r is seeded from (seed, s, r) at the start of the
step, so a resumed run draws exactly what the uninterrupted run would have drawn; the checkpoint's
step number is its RNG state.
"""

from __future__ import annotations

import functools
import json
import os
import random
import shutil
import signal
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from hiar.atomic import atomic_path
from hiar.checkpoints import save_model
from hiar.config import Config, config_to_dict, save_config

def init_distributed() -> tuple[int, int]:
    """Join (or, run as a plain script, create) the process group; returns (rank, world size)."""
    import deepspeed

    if "RANK" not in os.environ:  # a plain single-process run: a group of one on a free local port
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    if not torch.distributed.is_initialized():
        if not torch.cuda.is_available():
            clear_stale_build_lock("deepspeed_shm_comm")
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


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


def seed_step(seed: int, step: int, rank: int) -> None:
    s = hash((seed, step, rank)) & 0x7FFFFFFF
    random.seed(s)
    torch.manual_seed(s)


class NonFiniteLossError(RuntimeError):
    pass


class EMA:
    """Exponential moving average of a model's weights (float32), started at training step `start`
    from the weights of that moment, then updated after every update of the model (the distilled
    generator; the toy teacher with train.ema_decay)."""

    def __init__(self, decay: float, start: int):
        self.decay, self.start = decay, start
        self.shadow: dict[str, torch.Tensor] | None = None

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        if step < self.start:
            return
        with gathered(model):  # whole tensors under ZeRO-3, read before they are partitioned again
            state = model.state_dict()
            if self.shadow is None:
                self.shadow = {k: v.detach().float().clone() for k, v in state.items()}
                return
            for k, v in state.items():
                shadow = self.shadow[k] = self.shadow[k].to(v.device)  # a resumed EMA is loaded on the CPU
                shadow.lerp_(v.detach().float(), 1 - self.decay)

    def averaged(self, model: torch.nn.Module) -> torch.nn.Module:
        """The weights to sample and export: a copy of `model` holding the EMA once it has started,
        else `model` itself."""
        if self.shadow is None:
            return model
        copy = type(model)(model.config)  # a fresh module, not a deepcopy: ZeRO-3 partitions `model`'s tensors
        copy.load_state_dict(self.shadow)
        return copy.to(next(model.parameters()).device).eval()

    def state_dict(self) -> dict:
        return {"shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        self.shadow = state["shadow"]


class Trainer:
    """Owns the DeepSpeed engines of the models a program trains (one, or generator + critic), the
    loop, logging and checkpoints.

    `models` maps a name to a model, or to (model, learning rate) when it differs from train.lr.
    A program gives `fit` a step function `step_fn(step) -> metrics` that calls `optimize(name, loss)`
    for each update it makes (`update(loss)` when it trains one model).
    `extra` objects (e.g. the teacher's EMA) ride along in checkpoints (extra.pt) through `state_dict` /
    `load_state_dict`; `on_save(folder)` may add files to a checkpoint before it is published, and
    `on_load(folder)` reads back what they hold on --resume.
    """

    def __init__(self, cfg: Config, models: torch.nn.Module | dict[str, torch.nn.Module | tuple[torch.nn.Module, float]],
                 resume: bool = False, extra: dict[str, Any] | None = None,
                 on_save: Callable[[Path], None] | None = None, on_load: Callable[[Path], None] | None = None):
        import deepspeed

        self.cfg, t = cfg, cfg.train
        self.step = 0
        self.rank, self.world = init_distributed()
        self.out = Path(t.output_dir)
        self.ckpt_root = self.out / "checkpoints"
        self.extra, self.on_save, self.on_load = extra or {}, on_save, on_load
        ds = json.loads(Path(t.deepspeed).read_text())
        ds.update(train_micro_batch_size_per_gpu=t.batch_size, gradient_accumulation_steps=1,
                  gradient_clipping=t.grad_clip, bf16={"enabled": t.bf16})
        if isinstance(models, torch.nn.Module):
            models = {"model": models}
        self.engines = {}
        for name, entry in models.items():
            model, lr = entry if isinstance(entry, tuple) else (entry, t.lr)
            if t.gradient_checkpointing:
                enable_activation_checkpointing(model)
            params = [p for p in model.parameters() if p.requires_grad]
            optimizer = torch.optim.AdamW(params, lr=lr, betas=t.betas, weight_decay=t.weight_decay)
            schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda updates: self._lr_scale(updates))
            self.engines[name], _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=schedule,
                                                               config=ds)
        self.skipped = 0
        self.grad_norms: dict[str, float] = {}  # of each model's last update, before clipping
        self._stop = False
        if resume:
            self._resume()
        signal.signal(signal.SIGTERM, self._on_sigterm)
        self._wandb = None
        if self.rank == 0:
            save_config(cfg, self.out / "config.yaml")
            if t.wandb != "disabled":
                import wandb

                self._wandb = wandb.init(mode=t.wandb, dir=str(self.out), config=config_to_dict(cfg))

    @property
    def engine(self):
        """The engine of a one-model program."""
        (engine,) = self.engines.values()
        return engine

    @property
    def model(self) -> torch.nn.Module:
        return self.engine.module

    def log(self, message: str) -> None:
        if self.rank == 0:
            tqdm.write(message)

    # -- the loop --------------------------------------------------------------------------------------

    def fit(self, step_fn: Callable[[int], dict[str, float]], on_sample: Callable[[int], None] | None = None) -> None:
        t = self.cfg.train
        bar = tqdm(total=t.steps, initial=self.step, unit="step", disable=self.rank != 0)
        window: dict[str, list[float]] = {}  # metrics since the last log line (a generator loss may come every 5th step)
        while self.step < t.steps and not self._stop:
            seed_step(t.seed, self.step, self.rank)
            for key, value in step_fn(self.step).items():
                window.setdefault(key, []).append(value)
            self.step += 1
            bar.update(1)
            if self.step % t.log_every == 0 or self.step == t.steps:
                metrics = {key: sum(values) / len(values) for key, values in window.items()}
                window.clear()
                lrs = {f"lr/{n}" if len(self.engines) > 1 else "lr": e.get_lr()[0] for n, e in self.engines.items()}
                self._log_scalars({**metrics, **lrs})
                bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items() if "loss" in k})
            if t.save_every and self.step % t.save_every == 0:
                self.save()
            if on_sample and t.sample_every and self.step % t.sample_every == 0:
                on_sample(self.step)
        bar.close()
        self.save()
        if self._stop:
            self.log(f"SIGTERM: saved step {self.step} to {self.ckpt_root}; resume with --resume")

    def optimize(self, name: str, loss: torch.Tensor) -> float:
        """One update of model `name` from `loss`; a non-finite loss (on any rank) skips it. Returns the loss."""
        engine = self.engines[name]
        if self._all_finite(loss):
            engine.backward(loss)
            # ZeRO 1-3 keep gradients in their own buffers and measure the norm; stage 0 leaves them in .grad
            grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
            norm = torch.linalg.vector_norm(torch.stack([g.float().norm() for g in grads])).item() if grads else None
            engine.step()
            self.grad_norms[name] = norm if norm is not None else float(engine.get_global_grad_norm() or "nan")
        else:
            self.skipped += 1
            self.log(f"step {self.step}: non-finite {name} loss {loss.item()}, update skipped "
                     f"({self.skipped} so far)")
            if self.skipped > self.cfg.train.max_nonfinite:
                raise NonFiniteLossError(f"{self.skipped} updates had a non-finite loss (train.max_nonfinite="
                                         f"{self.cfg.train.max_nonfinite}); lower train.lr or check the data")
        return loss.item()

    def _lr_scale(self, updates: int) -> float:
        """The learning-rate multiplier of a model's next update, after `updates` of them: a linear warm-up
        over its first train.warmup_steps updates, then constant, and with train.decay_steps a linear decay
        to zero over the run's last decay_steps steps (a constant rate can be extended by resuming; the
        decay anneals the weights at the end). The scheduler runs after an update, before `step` moves on."""
        t = self.cfg.train
        scale = min(1.0, (updates + 1) / max(1, t.warmup_steps))
        if t.decay_steps:
            upcoming = self.step + 1 if updates else self.step
            scale *= min(1.0, (t.steps - upcoming) / t.decay_steps)
        return scale

    def update(self, loss: torch.Tensor) -> dict[str, float]:
        """`optimize` for a program that trains one model: the metrics `fit` logs for it."""
        (name,) = self.engines
        loss = self.optimize(name, loss)
        return {"loss": loss, "grad_norm": self.grad_norms.get(name, float("nan"))}

    def _all_finite(self, loss: torch.Tensor) -> bool:
        """Every rank skips together when any rank's loss is not finite."""
        flag = torch.tensor([float(torch.isfinite(loss.detach()).all())])
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
        return bool(flag.item())

    def _log_scalars(self, scalars: dict[str, float]) -> None:
        self.log(f"step {self.step}: " + ", ".join(f"{k} {v:.5g}" for k, v in scalars.items()))
        if self.rank == 0:  # machine-readable too: one JSON line a logged step
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"step": self.step, **scalars}) + "\n")
        if self._wandb is not None:
            self._wandb.log(scalars, step=self.step)

    def _on_sigterm(self, signum, frame) -> None:
        self._stop = True  # finish the step, save, leave

    # -- checkpoints -----------------------------------------------------------------------------------

    def save(self) -> Path:
        """Checkpoint step N as checkpoints/step-N, atomically: written under a temporary name, renamed,
        then `latest` points at it. Inside: one DeepSpeed folder per model (weights, optimizer,
        scheduler), extra.pt (EMA and the like), the config, and the step (hence the RNG state)."""
        tag = f"step-{self.step:08d}"
        final = self.ckpt_root / tag
        if final.exists():
            return final
        tmp = self.ckpt_root / f".{tag}.tmp"
        for name, engine in self.engines.items():
            engine.save_checkpoint(str(tmp), tag=name, save_latest=False,
                                   client_state={"step": self.step, "skipped": self.skipped})
        if self.on_save is not None:
            self.on_save(tmp)
        torch.distributed.barrier()
        if self.rank == 0:
            torch.save({name: obj.state_dict() for name, obj in self.extra.items()}, tmp / "extra.pt")
            save_config(self.cfg, tmp / "config.yaml")
            os.replace(tmp, final)
            with atomic_path(self.ckpt_root / "latest") as f:
                f.write_text(tag)
            for old in sorted(self.ckpt_root.glob("step-*"))[:-2]:  # keep the last two
                shutil.rmtree(old, ignore_errors=True)
        torch.distributed.barrier()
        return final

    def _resume(self) -> None:
        latest = self.ckpt_root / "latest"
        if not latest.is_file():
            self.log(f"--resume: no checkpoint under {self.ckpt_root}, starting at step 0")
            return
        folder = self.ckpt_root / latest.read_text().strip()
        for name, engine in self.engines.items():
            _, client = engine.load_checkpoint(str(folder), tag=name)
            if client is None:
                raise RuntimeError(f"{folder / name}: DeepSpeed could not load this checkpoint")
        extra = torch.load(folder / "extra.pt", map_location="cpu", weights_only=True)
        for name, obj in self.extra.items():
            if name in extra:
                obj.load_state_dict(extra[name])
            else:  # e.g. an EMA switched on for a resumed run: it starts from the resumed weights
                self.log(f"{folder}: no '{name}' state in extra.pt, '{name}' starts afresh")
        if self.on_load is not None:
            self.on_load(folder)
        self.step, self.skipped = client["step"], client["skipped"]
        self.log(f"resumed from {folder} at step {self.step}")

    def export(self, path: str | os.PathLike | None = None, name: str | None = None,
               module: torch.nn.Module | None = None) -> Path:
        """A trained model (`name`, or any `module`) as one safetensors file with its config: what
        inference and the next stage load."""
        path = Path(path) if path else self.out / "model.safetensors"
        module = module if module is not None else self.engines[name].module if name else self.model
        with gathered(module):  # whole tensors under ZeRO-3
            if self.rank == 0:
                save_model(module, self.cfg, path)
        torch.distributed.barrier()
        return path


def gathered(module: torch.nn.Module):
    """Context in which every parameter of `module` is whole on every rank (a no-op below ZeRO-3)."""
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None)


def enable_activation_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each transformer block's activations in the backward pass instead of storing them.

    Applied from outside the model (STYLE.md 3). Safe with the KV cache: cache writes run without grad,
    so no checkpointed forward writes the cache.
    """
    from torch.utils.checkpoint import checkpoint

    for block in getattr(model, "blocks", []):
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)


def main_guard(fn: Callable[[], None]) -> None:
    """Run a training program; a non-finite-loss abort ends it with its message and exit code 3."""
    try:
        fn()
    except NonFiniteLossError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(3)
