"""The training loop every train/ program shares, on DeepSpeed (CPU with gloo works, as does the launcher).

A program supplies a loss function `loss_fn(model, step) -> loss`; the `Trainer` owns everything else:
the DeepSpeed engine (ZeRO stage and offload from `train.deepspeed`; batch size, clipping and
precision from the config), a torch AdamW (no C++ op build), warm-up, a progress bar, logging to
stdout and optionally wandb (offline by default), atomic checkpoints, `--resume`, SIGTERM handling
and the non-finite-loss guard.

Reproducibility: the random state of step s on rank r is seeded from (seed, s, r) at the start of the
step, so a resumed run draws exactly what the uninterrupted run would have drawn; the checkpoint's
step number is its RNG state.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm import tqdm

from hiar.atomic import atomic_path
from hiar.checkpoints import save_model
from hiar.config import Config, config_to_dict, save_config

LossFn = Callable[[torch.nn.Module, int], torch.Tensor]


def init_distributed() -> tuple[int, int]:
    """Join (or, run as a plain script, create) the process group; returns (rank, world size)."""
    import deepspeed

    if "RANK" not in os.environ:  # a plain single-process run: a group of one on a free local port
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def seed_step(seed: int, step: int, rank: int) -> None:
    s = hash((seed, step, rank)) & 0x7FFFFFFF
    random.seed(s)
    torch.manual_seed(s)


class NonFiniteLossError(RuntimeError):
    pass


class Trainer:
    def __init__(self, cfg: Config, model: torch.nn.Module, resume: bool = False):
        import deepspeed

        self.cfg, t = cfg, cfg.train
        self.rank, self.world = init_distributed()
        self.out = Path(t.output_dir)
        self.ckpt_root = self.out / "checkpoints"
        ds = json.loads(Path(t.deepspeed).read_text())
        ds.update(train_micro_batch_size_per_gpu=t.batch_size, gradient_accumulation_steps=1,
                  gradient_clipping=t.grad_clip, bf16={"enabled": t.bf16})
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=t.lr, betas=t.betas, weight_decay=t.weight_decay)
        warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, t.warmup_steps)))
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=warmup, config=ds)
        self.step = 0
        self.skipped = 0
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
    def model(self) -> torch.nn.Module:
        return self.engine.module

    def log(self, message: str) -> None:
        if self.rank == 0:
            tqdm.write(message)

    # -- the loop --------------------------------------------------------------------------------------

    def fit(self, loss_fn: LossFn, on_sample: Callable[[int], None] | None = None) -> None:
        t = self.cfg.train
        bar = tqdm(total=t.steps, initial=self.step, unit="step", disable=self.rank != 0)
        while self.step < t.steps and not self._stop:
            seed_step(t.seed, self.step, self.rank)
            loss = loss_fn(self.engine, self.step)
            if self._all_finite(loss):
                self.engine.backward(loss)
                self.engine.step()
            else:
                self.skipped += 1
                self.log(f"step {self.step}: non-finite loss {loss.item()}, step skipped ({self.skipped} so far)")
                if self.skipped > t.max_nonfinite:
                    raise NonFiniteLossError(f"{self.skipped} steps had a non-finite loss (train.max_nonfinite="
                                             f"{t.max_nonfinite}); lower train.lr or check the data")
            self.step += 1
            bar.update(1)
            if self.step % t.log_every == 0 or self.step == t.steps:
                self._log_scalars({"loss": loss.item(), "lr": self.engine.get_lr()[0]})
                bar.set_postfix(loss=f"{loss.item():.4f}")
            if t.save_every and self.step % t.save_every == 0:
                self.save()
            if on_sample and t.sample_every and self.step % t.sample_every == 0:
                on_sample(self.step)
        bar.close()
        self.save()
        if self._stop:
            self.log(f"SIGTERM: saved step {self.step} to {self.ckpt_root}; resume with --resume")

    def _all_finite(self, loss: torch.Tensor) -> bool:
        """Every rank skips together when any rank's loss is not finite."""
        flag = torch.tensor([float(torch.isfinite(loss.detach()).all())])
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
        return bool(flag.item())

    def _log_scalars(self, scalars: dict[str, float]) -> None:
        self.log(f"step {self.step}: " + ", ".join(f"{k} {v:.5g}" for k, v in scalars.items()))
        if self._wandb is not None:
            self._wandb.log(scalars, step=self.step)

    def _on_sigterm(self, signum, frame) -> None:
        self._stop = True  # finish the step, save, leave

    # -- checkpoints -----------------------------------------------------------------------------------

    def save(self) -> Path:
        """Checkpoint step N as checkpoints/step-N, atomically: written under a temporary name, renamed,
        then `latest` points at it. Model, optimizer, scheduler and step (hence RNG) are inside."""
        tag = f"step-{self.step:08d}"
        final = self.ckpt_root / tag
        if final.exists():
            return final
        tmp_tag = f".{tag}.tmp"
        self.engine.save_checkpoint(str(self.ckpt_root), tag=tmp_tag, save_latest=False,
                                    client_state={"step": self.step, "skipped": self.skipped})
        torch.distributed.barrier()
        if self.rank == 0:
            save_config(self.cfg, self.ckpt_root / tmp_tag / "config.yaml")
            os.replace(self.ckpt_root / tmp_tag, final)
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
        tag = latest.read_text().strip()
        _, client = self.engine.load_checkpoint(str(self.ckpt_root), tag=tag)
        if client is None:
            raise RuntimeError(f"{self.ckpt_root / tag}: DeepSpeed could not load this checkpoint")
        self.step, self.skipped = client["step"], client["skipped"]
        self.log(f"resumed from {self.ckpt_root / tag} at step {self.step}")

    def export(self, path: str | os.PathLike | None = None) -> Path:
        """The trained model as one safetensors file with its config (what inference and the next stage load)."""
        import deepspeed

        path = Path(path) if path else self.out / "model.safetensors"
        params = list(self.model.parameters())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):  # whole tensors under ZeRO-3
            if self.rank == 0:
                save_model(self.model, self.cfg, path)
        torch.distributed.barrier()
        return path


def main_guard(fn: Callable[[], None]) -> None:
    """Run a training program; a non-finite-loss abort ends it with its message and exit code 3."""
    try:
        fn()
    except NonFiniteLossError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(3)
