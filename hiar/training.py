"""The training loop every train/ program shares, on DeepSpeed (CPU with gloo works, as does the launcher).

A program supplies a step function `step_fn(step) -> metrics` that hands `Trainer.optimize` a function
giving the loss of each micro-step; the `Trainer` owns everything else: the process group and device
(`hiar.distributed`), the DeepSpeed engines (ZeRO stage and offload from `train.deepspeed`; micro
batch, gradient accumulation to `train.total_batch_size`, clipping and precision from the config), a
torch AdamW (no C++ op build), the learning-rate schedule (warm-up, optional decay), a progress bar,
logging to stdout and optionally wandb (offline by default), atomic checkpoints, `--resume`, SIGTERM
handling and the non-finite-loss guard.

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
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from hiar import distributed, lora, runs
from hiar.atomic import atomic_path
from hiar.checkpoints import CheckpointError, empty_model, load_weights, save_adapter, save_model
from hiar.config import Config, ConfigError, TrainConfig, config_to_dict, repo_path, save_config
from hiar.models.wan import compile_blocks


def seed_step(seed: int, step: int, rank: int) -> None:
    s = hash((seed, step, rank)) & 0x7FFFFFFF
    random.seed(s)
    torch.manual_seed(s)


class NonFiniteLossError(RuntimeError):
    pass


def accumulation_steps(cfg: Config, world_size: int) -> int:
    """Micro-steps per update: train.total_batch_size / (train.batch_size x world size), exactly."""
    t = cfg.train
    per_micro_step = t.batch_size * world_size
    total = t.total_batch_size or per_micro_step
    if total % per_micro_step:
        fits = [n for n in range(1, 4097) if total % (t.batch_size * n) == 0]
        raise ConfigError(f"train.total_batch_size={total} is not a multiple of train.batch_size={t.batch_size} x "
                          f"{world_size} processes; it divides evenly on {fits[:8]} processes, or set "
                          f"train.total_batch_size={-(-total // per_micro_step) * per_micro_step}")
    return total // per_micro_step


class EMA:
    """Exponential moving average of a model's weights, started at training step `start` from the
    weights of that moment, then updated after every update of the model (the distilled generator;
    the toy teacher with train.ema_decay).

    The average lives in float32 in host memory, on the main rank only (`keep`): a 1.3B generator's is
    5.2 GB, which would otherwise take GPU memory on every rank. Every rank still calls `update`, since
    reading a ZeRO-3 model's weights is collective, and knows whether the average has `started`.

    A model with LoRA adapters (hiar/lora.py) is averaged over its adapter alone (what training changes:
    `hiar.lora.trained_state`), and `averaged` rebuilds the adapted model from `base`, its frozen weights
    as `hiar.lora.base_state` gives them, taken once before training (on the keeping rank).
    """

    def __init__(self, decay: float, start: int, keep: bool = True, base: dict[str, torch.Tensor] | None = None):
        self.decay, self.start, self.keep, self.base = decay, start, keep, base
        self.started = False
        self.shadow: dict[str, torch.Tensor] | None = None

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        if step < self.start:
            return
        with gathered(model):  # whole tensors under ZeRO-3, read before they are partitioned again
            if self.keep:
                first = self.shadow is None  # then copies: a CPU float32 model's .to() would alias its weights
                trained = lora.trained_state(model)  # every weight, or a LoRA model's adapter
                state = {k: v.detach().to("cpu", torch.float32, copy=first) for k, v in trained.items()}
                if first:
                    self.shadow = state
                else:
                    for k, v in state.items():
                        self.shadow[k].lerp_(v, 1 - self.decay)
        self.started = True

    def averaged(self, model: torch.nn.Module) -> torch.nn.Module:
        """A copy of `model` (on its device) holding the average; call where `keep` and `started`."""
        if self.shadow is None:
            raise RuntimeError("the EMA has not started on this rank")
        # a fresh module, not a deepcopy (ZeRO-3 partitions `model`'s tensors), built without storage: the
        # average is all its weights, or the frozen base and the averaged adapter
        if self.base is None:
            copy = load_weights(empty_model(model.config), self.shadow, "the EMA")
        else:
            copy = lora.add_adapters(load_weights(empty_model(model.config), self.base, "the EMA's base"),
                                     lora.adapter_config(model))
            lora.set_adapter_state(copy, self.shadow)
        return copy.to(next(model.parameters()).device).eval()

    def state_dict(self) -> dict:
        return {"shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        self.started = state["shadow"] is not None
        self.shadow = {k: v.float().cpu() for k, v in state["shadow"].items()} if self.keep and self.started else None


class Trainer:
    """Owns the DeepSpeed engines of the models a program trains (one, or generator + critic), the
    loop, logging and checkpoints.

    `models` maps a name to a model, or to (model, learning rate) when it differs from train.lr.
    A program gives `fit` a step function `step_fn(step) -> metrics` that calls
    `optimize(name, micro_loss)` for each update it makes (`update(micro_loss)` when it trains one
    model); `micro_loss(m)` computes micro-step m's loss on that micro-step's own samples.
    `extra` objects (e.g. the teacher's EMA) ride along in checkpoints (extra.pt) through `state_dict` /
    `load_state_dict`; `on_save(folder)` may add files to a checkpoint before it is published, and
    `on_load(folder)` reads back what they hold on --resume.
    """

    def __init__(self, cfg: Config, models: torch.nn.Module | dict[str, torch.nn.Module | tuple[torch.nn.Module, float]],
                 resume: bool = False, extra: dict[str, Any] | None = None,
                 on_save: Callable[[Path], None] | None = None, on_load: Callable[[Path], None] | None = None,
                 world: distributed.World | None = None):
        import deepspeed

        if cfg.runtime.fp8_linear != "off":  # it rounds weights in place (hiar/fp8.py): never a model in training
            raise ConfigError(f"runtime.fp8_linear={cfg.runtime.fp8_linear} is a sampling option and would round the "
                              "trained weights in place; set runtime.fp8_linear=off for training")
        self.cfg, t = cfg, cfg.train
        self.step = 0
        self.world = world or distributed.init()
        self.rank, self.device = self.world.rank, self.world.device
        self.accumulation = accumulation_steps(cfg, self.world.size)
        self.out = repo_path(t.output_dir)
        self.ckpt_root = self.out / "checkpoints"
        self.extra, self.on_save, self.on_load = extra or {}, on_save, on_load
        ds = json.loads(repo_path(t.deepspeed).read_text())
        ds.update(train_micro_batch_size_per_gpu=t.batch_size, gradient_accumulation_steps=self.accumulation,
                  train_batch_size=t.batch_size * self.accumulation * self.world.size,
                  gradient_clipping=t.grad_clip, bf16={"enabled": t.bf16})
        if isinstance(models, torch.nn.Module):
            models = {"model": models}
        self.engines = {}
        for name, entry in models.items():
            model, lr = entry if isinstance(entry, tuple) else (entry, t.lr)
            if t.gradient_checkpointing:
                enable_activation_checkpointing(model)
            apply_cpu_speedups(model, t)
            # a model with LoRA adapters (hiar/lora.py) trains them alone: its base weights are frozen, and
            # DeepSpeed keeps no gradients, master weights or AdamW states for parameters it is not given
            params = [p for p in model.parameters() if p.requires_grad]
            optimizer = torch.optim.AdamW(params, lr=lr, betas=t.betas, weight_decay=t.weight_decay)
            schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda updates: self._lr_scale(updates))
            # DeepSpeed moves the model to this rank's device (and to bf16) itself
            self.engines[name], _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=schedule,
                                                               config=ds)
            runs.weights_only(self.engines[name])
        self.zero_stage = next(iter(self.engines.values())).zero_optimization_stage()
        self.skipped = 0
        self.grad_norms: dict[str, float] = {}  # of each model's last update, before clipping
        self._stop = False
        if resume:
            self._resume()
        else:
            runs.check_fresh(self.out)
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

    def optimize(self, name: str, micro_loss: Callable[[int], tuple[torch.Tensor, dict[str, float]]]) -> dict[str, float]:
        """One update of model `name`: `micro_loss(m)` gives the loss (and metrics) of micro-step m for
        m < `accumulation`, each on fresh samples; DeepSpeed averages their gradients and steps once.

        A non-finite loss on any rank (one all-reduce on this rank's device) is not back-propagated:
        with one micro-step the update is skipped; with several, that micro-step contributes a zero
        gradient instead (every rank must still run the backward: ZeRO's gradient reduction is
        collective), so the update is made from the finite micro-steps. Returns the micro-steps' mean
        metrics with `loss` and `grad_norm`."""
        engine = self.engines[name]
        sums: dict[str, float] = {}
        norm = None
        for micro in range(self.accumulation):
            loss, metrics = micro_loss(micro)
            for key, value in {"loss": loss.item(), **metrics}.items():
                sums[key] = sums.get(key, 0.0) + value / self.accumulation
            if not distributed.all_true(bool(torch.isfinite(loss.detach()).all()), self.device):
                self._count_nonfinite(name, loss)
                if self.accumulation == 1:
                    return {**sums, "grad_norm": float("nan")}
                loss = zero_loss(engine.module)
            engine.backward(loss)
            if engine.is_gradient_accumulation_boundary():
                # ZeRO 1-3 keep gradients in their own buffers and measure the norm; stage 0 leaves them in .grad
                grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
                norm = torch.linalg.vector_norm(torch.stack([g.float().norm() for g in grads])).item() if grads else None
            engine.step()
        self.grad_norms[name] = norm if norm is not None else float(engine.get_global_grad_norm() or "nan")
        return {**sums, "grad_norm": self.grad_norms[name]}

    def _count_nonfinite(self, name: str, loss: torch.Tensor) -> None:
        self.skipped += 1
        self.log(f"step {self.step}: non-finite {name} loss {loss.item()} on some rank, not back-propagated "
                 f"({self.skipped} so far)")
        if self.skipped > self.cfg.train.max_nonfinite:
            raise NonFiniteLossError(f"{self.skipped} micro-steps had a non-finite loss (train.max_nonfinite="
                                     f"{self.cfg.train.max_nonfinite}); lower train.lr or check the data")

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

    def update(self, micro_loss: Callable[[int], torch.Tensor]) -> dict[str, float]:
        """`optimize` for a program that trains one model, from the loss of each micro-step."""
        (name,) = self.engines
        return self.optimize(name, lambda micro: (micro_loss(micro), {}))

    def sampling_module(self, name: str | None = None, ema: EMA | None = None) -> torch.nn.Module | None:
        """The module this rank samples videos with, or None when it sits out: the EMA copy on the main
        rank once the average has started; else the trained model on the main rank, and under ZeRO-3 on
        every rank, since each forward there gathers parameters collectively (rank 0 alone would hang)."""
        module = self.engines[name].module if name else self.model
        if ema is not None and ema.started:
            return ema.averaged(module) if ema.keep else None
        return module if self.rank == 0 or self.zero_stage == 3 else None

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
        scheduler), extra.pt (EMA and the like), the config, and the step (hence the RNG state). A save
        that fails on any rank (a full disk) removes its temporary and ends the run; `latest` and the
        checkpoints before it stay as they were (hiar/runs.py)."""
        tag = f"step-{self.step:08d}"
        final = self.ckpt_root / tag
        if final.exists():
            return final
        tmp = self.ckpt_root / f".{tag}.tmp"
        failure = None
        try:
            for name, engine in self.engines.items():
                engine.save_checkpoint(str(tmp), tag=name, save_latest=False,
                                       client_state={"step": self.step, "skipped": self.skipped})
            if self.on_save is not None:
                self.on_save(tmp)
            if self.rank == 0:
                torch.save({name: obj.state_dict() for name, obj in self.extra.items()}, tmp / "extra.pt")
                save_config(self.cfg, tmp / "config.yaml")
        except OSError as err:
            failure = err
        if not distributed.all_true(failure is None, self.device):
            if self.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointError(f"could not write checkpoint {final} ({failure or 'on another rank'}); "
                                  f"{self.ckpt_root / 'latest'} still names the last complete one: make room, "
                                  "then rerun with --resume")
        if self.rank == 0:
            os.replace(tmp, final)
            with atomic_path(self.ckpt_root / "latest") as f:
                f.write_text(tag)
            runs.prune(self.ckpt_root, self.cfg.train.keep_checkpoints)
        torch.distributed.barrier()
        return final

    def _resume(self) -> None:
        """Load the newest readable checkpoint (every rank the same one), setting unreadable ones aside;
        with none readable, stop naming what each one failed on."""
        if self.rank == 0:
            for partial in runs.clean_partials(self.ckpt_root):
                self.log(f"removed {partial}, the temporary of an interrupted save")
        folders, failures = runs.candidates(self.ckpt_root), []
        if not folders:
            self.log(f"--resume: no checkpoint under {self.ckpt_root}, starting at step 0")
            return
        for folder in folders:
            try:
                self._load(folder)
                failure = None
            except (runs.UnreadableCheckpointError, CheckpointError) as err:
                failure = err
            if distributed.all_true(failure is None, self.device):
                self.log(f"resumed from {folder} at step {self.step}")
                return
            failures.append(f"{failure or 'unreadable on another rank'}")
            if self.rank == 0:
                self.log(f"--resume: {folder} is unreadable ({failures[-1]}); set aside as "
                         f"{runs.set_aside(folder)}, trying the next newest")
            torch.distributed.barrier()
        raise CheckpointError(f"--resume: none of the {len(folders)} checkpoints under {self.ckpt_root} is readable "
                              f"(set aside as corrupt-step-*): {'; '.join(failures)}")

    def _load(self, folder: Path) -> None:
        for name, engine in self.engines.items():
            if not (folder / name).is_dir():
                raise CheckpointError(f"{folder} holds no '{name}' model: a checkpoint of another program?")
            try:
                _, client = engine.load_checkpoint(str(folder), tag=name)
            except (AssertionError, KeyError, ValueError) as err:  # DeepSpeed's own checks of what it read
                raise CheckpointError(f"{folder / name}: DeepSpeed could not load it ({type(err).__name__}: "
                                      f"{str(err)[:200]})") from None
            if client is None:
                raise CheckpointError(f"{folder / name}: DeepSpeed could not load this checkpoint")
        extra = runs.load_weights_only(folder / "extra.pt", map_location="cpu")
        for name, obj in self.extra.items():
            if name in extra:
                obj.load_state_dict(extra[name])
            else:  # e.g. an EMA switched on for a resumed run: it starts from the resumed weights
                self.log(f"{folder}: no '{name}' state in extra.pt, '{name}' starts afresh")
        if self.on_load is not None:
            self.on_load(folder)
        self.step, self.skipped = client["step"], client["skipped"]

    def export(self, path: str | os.PathLike | None = None, name: str | None = None,
               ema: EMA | None = None) -> Path:
        """A trained model (`name`, or the one model) as one safetensors file with its config, what
        inference and the next stage load: its EMA once that has started (written by the main rank,
        which holds it), else the model's own weights (gathered whole under ZeRO-3, on every rank).
        A model with LoRA adapters is written merged, and its adapter beside it as adapter.safetensors
        (`hiar.checkpoints.save_adapter`: what `inference.py --lora` applies to the base model)."""
        path = Path(path) if path else self.out / "model.safetensors"
        module = self.engines[name].module if name else self.model

        def write(model: torch.nn.Module) -> None:
            save_model(model, self.cfg, path)
            if lora.has_adapters(model):
                save_adapter(model, self.cfg, path.parent / "adapter.safetensors")

        if ema is not None and ema.started:
            if ema.keep:
                write(ema.averaged(module))
        else:
            with gathered(module):
                if self.rank == 0:
                    write(module)
        torch.distributed.barrier()
        return path


def zero_loss(module: torch.nn.Module) -> torch.Tensor:
    """A loss whose gradient is zero for every trainable parameter (stands in for a non-finite one)."""
    return sum(p.sum() for p in module.parameters() if p.requires_grad) * 0.0


def frozen(model: torch.nn.Module, cfg: Config, world: distributed.World, placement: str) -> torch.nn.Module:
    """A model that is only evaluated (distillation's teacher) in train.bf16's precision, placed per
    `placement` (distill.teacher_sharding): "replicated", a whole copy on this rank's device; "zero3",
    its parameters partitioned over the ranks by a DeepSpeed ZeRO-3 engine without optimizer, each
    layer gathered for its forward (a 14B teacher takes 28 GB / world size per GPU instead of 28 GB);
    "zero3_offload", the partitions in pinned host memory, streamed in as layers run. Under ZeRO-3 the
    forwards are collective: every rank must run the same number of them."""
    import deepspeed

    model.requires_grad_(False).eval()
    apply_cpu_speedups(model, cfg.train)
    dtype = torch.bfloat16 if cfg.train.bf16 else torch.float32
    if placement == "replicated":
        return model.to(world.device, dtype)
    zero = {"stage": 3}
    if placement == "zero3_offload":
        zero["offload_param"] = {"device": "cpu", "pin_memory": world.device.type == "cuda"}
    ds = {"train_micro_batch_size_per_gpu": cfg.train.batch_size, "gradient_accumulation_steps": 1,
          "train_batch_size": cfg.train.batch_size * world.size, "zero_optimization": zero,
          "bf16": {"enabled": cfg.train.bf16}, "steps_per_print": 10**9}
    engine, _, _, _ = deepspeed.initialize(model=model, config=ds)
    return engine.module


def gathered(module: torch.nn.Module):
    """Context in which every parameter of `module` is whole on every rank (a no-op below ZeRO-3)."""
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None)


def native_cpu_bfloat16() -> bool:
    """Whether this CPU multiplies bfloat16 natively, as oneDNN (which runs CPU autocast's matmuls) says."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def apply_cpu_speedups(model: torch.nn.Module, t: TrainConfig) -> None:
    """train.compile_blocks and train.autocast on a model that training runs, in place. Autocast wraps the
    model's forward alone, so data and prompts are made in float32 as before (the toy codec's encode
    and the sentence encoder are matmuls that autocast would round)."""
    if t.compile_blocks:
        compile_blocks(model)
    if t.autocast:
        if not torch.cuda.is_available() and not native_cpu_bfloat16():
            warnings.warn("train.autocast on a CPU without native bfloat16 (no AVX512-BF16 or AMX): its bfloat16 "
                          "matmuls are emulated, and the toy teacher's step took 10x float32's on such a CPU "
                          "(docs/training.md, \"Training on CPU cores\"); leave train.autocast off here",
                          stacklevel=2)
        forward = model.forward

        @functools.wraps(forward)
        def autocast_forward(*args, **kwargs):
            with torch.autocast(next(model.parameters()).device.type, torch.bfloat16):
                return forward(*args, **kwargs)

        model.forward = autocast_forward  # an instance attribute: the weights and their names are untouched


def enable_activation_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each transformer block's activations in the backward pass instead of storing them.

    Applied from outside the model, per transformer block. Safe with the KV cache: a cached forward
    captures the context K/V it attends to when it starts (`SelfAttentionContext`), so a block
    recomputed in backward reads the same tensors even after the rollout has evicted or rewritten
    those frames, and a recompute never writes the cache again.
    """
    from torch.utils.checkpoint import checkpoint

    for block in getattr(model, "blocks", []):
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)


def main_guard(fn: Callable[[], None]) -> None:
    """Run a training program: a setting to change (a bad config, a run that does not fit, a total batch
    that does not divide, a run folder in use) ends it with its message and exit code 2, a checkpoint
    that cannot be written or read with 1, a non-finite-loss abort with 3.

    A run that ends well leaves its process group (`distributed.end`); a run that failed does not: other
    ranks may still be in a collective, and destroying the group under them can hang. Its exit code
    already says it failed."""
    try:
        fn()
        distributed.end()
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    except NonFiniteLossError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(3)
