"""Distil the causal student with DMD on its own rollouts, in step-first order (HiAR) or block-first
order (the Self-Forcing baseline), plus the forward-KL regulariser (docs/training.md).

    deepspeed train/distill.py --config_path configs/toy/hiar.yaml
    torchrun --nproc_per_node=8 train/distill.py --config_path configs/hiar.yaml
    python train/distill.py --config_path configs/toy/hiar.yaml --resume --max_steps 200
    torchrun --nproc_per_node=8 train/distill.py --config_path configs/hiar.yaml --rehearse --max_steps 6

Two trained models, the generator (causal student, from distill.generator) and the critic (fake score,
from distill.critic), and a frozen teacher (real score, distill.teacher, CFG against
train.negative_prompt). Every iteration updates the critic; every distill.dfake_gen_update_ratio-th
also the generator. Checkpoints (checkpoints/step-N/) hold both DeepSpeed states and model.pt
({generator, generator_ema, critic, step, config}: what `inference.py --checkpoint_path ... --use_ema`
loads, and where --resume finds the EMA); the final generator (its EMA once started) is exported as
model.safetensors. With lora.rank > 0 the generator (and with lora.critic=lora the critic) trains LoRA
adapters on its frozen weights (hiar/lora.py, docs/lora.md): the EMA averages the adapter, checkpoints
and model.safetensors hold the merged weights, and adapter.safetensors the adapter. On CUDA the memory
planner (hiar/plan.py) checks the run before any weights are read; --rehearse swaps the weights, the
text encoder and the data for random ones of the same sizes.

This program builds the run's objects and hands them to `hiar.distill.Distillation`, whose named steps
make each iteration; `hiar.training.Trainer` loops over them and writes the checkpoints.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
import torch

from hiar import distributed, lora, runs
from hiar.checkpoints import load_generator
from hiar.config import Config, config_to_dict, load_config, repo_path, teacher_model_config
from hiar.data import PromptSource
from hiar.distill import Distillation
from hiar.models import WanModel
from hiar.plan import check_fits, estimate
from hiar.rehearsal import MemoryLog, RandomTrajectories, RandomUMT5, random_wan, rehearsal_prompts
from hiar.text import PromptBank
from hiar.training import EMA, Trainer, accumulation_steps, frozen, gathered, main_guard
from hiar.trajectories import TrajectoryStore

DMD_PROMPT_SEED = 2_000_003  # toyworld prompts for DMD: captions of clips no earlier stage used


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config_path", default="configs/toy/hiar.yaml")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    p.add_argument("--max_steps", type=int, help="train this many steps in all (sets train.steps)")
    p.add_argument("--rehearse", action="store_true",
                   help="random weights of the config's sizes, random prompts and trajectories, no downloads: "
                        "measure memory and time of an iteration (launch/rehearse.sh)")
    p.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    return p.parse_intermixed_args(argv)  # options may follow the section.key=value overrides


def check_inputs(cfg: Config) -> None:
    """Every file the run needs, before any model is built."""
    d = cfg.distill
    needed = {f"distill.{name}": repo_path(getattr(d, name)) for name in ("generator", "teacher", "critic")}
    if d.prompts != "toyworld":
        needed["distill.prompts"] = repo_path(d.prompts)
    if d.fkl_weight > 0:
        needed["ode.output_dir (manifest.json of train/ode_pairs.py)"] = repo_path(cfg.ode.output_dir) / "manifest.json"
    missing = [f"{key}={path}" for key, path in needed.items() if not path.exists()]
    if missing:
        raise SystemExit("error: missing inputs: " + "; ".join(missing) + ". Run the earlier stages first "
                         "(README: teacher -> ODE pairs -> ODE init), or point the config at existing files.")


def rehearsal_report(cfg: Config, world: distributed.World, memory: MemoryLog,
                     seconds: dict[bool, list[float]]) -> str:
    """Measured time per iteration and memory per start-up stage, next to the planner's estimate."""
    d = cfg.distill
    lines = [f"rehearsal on {world.size} x {world.device.type} (random weights; memory and time, not quality), "
             f"{accumulation_steps(cfg, world.size)} micro-step(s) of {cfg.train.batch_size} sample(s) an update:"]
    for generator_step, label in ((True, "generator + critic step"), (False, "critic-only step")):
        if seconds[generator_step]:
            lines.append(f"  {label:<28} {sum(seconds[generator_step]) / len(seconds[generator_step]):8.2f} s "
                         f"(mean of {len(seconds[generator_step])})")
    if seconds[True] and seconds[False]:
        r = d.dfake_gen_update_ratio
        mean = {g: sum(v) / len(v) for g, v in seconds.items()}
        lines.append(f"  {'per iteration (1 in ' + str(r) + ' steps updates the generator)':<28} "
                     f"{(mean[True] + (r - 1) * mean[False]) / r:8.2f} s")
    lines.append(memory.table())
    if world.device.type == "cuda":
        capacity = torch.cuda.get_device_properties(world.device).total_memory
        lines.append(estimate(cfg, world.size, capacity / 2**30, gpus_per_node()).table())
    return "\n".join(lines)


def gpus_per_node() -> int:
    """GPUs of this node in the run (torchrun's LOCAL_WORLD_SIZE; else every GPU the node has)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", torch.cuda.device_count()))


def check_memory(cfg: Config, world: distributed.World, rehearse: bool) -> None:
    """On CUDA, refuse a run that cannot fit before loading any weights; print the planner's table."""
    if world.device.type != "cuda":
        return
    capacity, per_node = torch.cuda.get_device_properties(world.device).total_memory, gpus_per_node()
    # a rehearsal measures what the planner estimates, so it runs even where the planner says no
    plan = estimate(cfg, world.size, capacity / 2**30, per_node) if rehearse else \
        check_fits(cfg, world.size, capacity, per_node)
    if world.is_main:
        print(plan.table())


def build_models(cfg: Config, world: distributed.World, rehearse: bool) -> tuple[WanModel, WanModel, WanModel]:
    """Generator, critic and teacher (not yet frozen). The teacher may be larger (distill.teacher_model)
    and is read in train.bf16's precision."""
    d = cfg.distill
    teacher_model = teacher_model_config(cfg)
    teacher_dtype = torch.bfloat16 if cfg.train.bf16 else torch.float32
    if rehearse:  # built straight on the GPU: a 14B teacher in float32 on the host would take minutes
        generator, critic = random_wan(cfg.model), random_wan(cfg.model)
        return generator, critic, random_wan(teacher_model, world.device, teacher_dtype)
    generator, _ = load_generator(repo_path(d.generator), cfg)
    critic, _ = load_generator(repo_path(d.critic), cfg)
    teacher, _ = load_generator(repo_path(d.teacher), dataclasses.replace(cfg, model=teacher_model),
                                dtype=teacher_dtype)
    return generator, critic, teacher


def with_adapters(cfg: Config, generator: WanModel, critic: WanModel, keep: bool) -> dict | None:
    """With lora.rank > 0: LoRA adapters on the generator (and on the critic with lora.critic=lora), their
    base weights frozen; returns the generator's base weights for its EMA on the rank that `keep`s it
    (a copy: DeepSpeed may partition or cast the model's own), else None."""
    if not cfg.lora.rank:
        return None
    base = {k: v.detach().clone() for k, v in lora.base_state(generator).items()} if keep else None
    lora.add_adapters(generator, cfg.lora, seed=cfg.train.seed)
    if cfg.lora.critic == "lora":
        lora.add_adapters(critic, cfg.lora, seed=cfg.train.seed + 1)
    return base


def write_model_pt(folder: Path, trainer: Trainer, ema: EMA) -> None:
    """model.pt: the layout HiAR / Self-Forcing checkpoints use, loadable by inference.py (adapted models
    merged). The EMA of a full generator is kept only here; a LoRA generator's rides in extra.pt."""
    generator, critic = trainer.engines["generator"].module, trainer.engines["critic"].module
    with gathered(generator), gathered(critic):
        if trainer.rank == 0:
            blob = {"generator": lora.merged_state(generator), "critic": lora.merged_state(critic),
                    "step": trainer.step, "config": config_to_dict(trainer.cfg)}
            if ema.shadow is not None:
                blob["generator_ema"] = ema.shadow if ema.base is None else lora.merged_state(ema.averaged(generator))
            torch.save(blob, folder / "model.pt")


def read_ema(folder: Path, ema: EMA) -> None:
    """The EMA back from model.pt, its only copy (a 1.3B generator's is 5 GB); mmap reads only it."""
    blob = runs.load_weights_only(folder / "model.pt", map_location="cpu", mmap=True)
    ema.load_state_dict({"shadow": blob.get("generator_ema")})  # absent before distill.ema_start


def prompt_bank(cfg: Config, device: torch.device, rehearse: bool) -> PromptBank:
    if rehearse and cfg.model.text_encoder == "umt5-xxl":
        return PromptBank(RandomUMT5(cfg.model.text_len, device), cfg.train.prompt_cache_mb * 2**20, device)
    return PromptBank.for_config(cfg, device)


def dmd_prompts(cfg: Config, rehearse: bool) -> PromptSource:
    """The rollouts' prompts: distill.prompts (toyworld: captions of clips no earlier stage used, in the
    style train.captions names), or the rehearsal's random ones."""
    return PromptSource(rehearsal_prompts() if rehearse else cfg.distill.prompts, DMD_PROMPT_SEED, cfg.video.height,
                        cfg.video.width, ROOT, cfg.train.captions)


def trajectory_source(cfg: Config, rehearse: bool) -> TrajectoryStore | RandomTrajectories | None:
    """Teacher trajectories for the forward-KL term; None when distill.fkl_weight switches it off."""
    if cfg.distill.fkl_weight > 0:
        return RandomTrajectories(cfg) if rehearse else TrajectoryStore(repo_path(cfg.ode.output_dir))
    return None


def rehearse(cfg: Config, trainer: Trainer, distillation: Distillation, memory: MemoryLog) -> None:
    """The iterations timed, then the rehearsal report."""
    seconds: dict[bool, list[float]] = {True: [], False: []}  # by whether the step updates the generator

    def timed_iteration(step: int) -> dict[str, float]:
        start = time.perf_counter()
        metrics = distillation.iteration(step)
        if trainer.device.type == "cuda":
            torch.cuda.synchronize(trainer.device)
        if step > 0:  # step 0 pays for allocation and kernel selection
            seconds[step % cfg.distill.dfake_gen_update_ratio == 0].append(time.perf_counter() - start)
        return metrics

    memory.start_steps()
    trainer.fit(timed_iteration)
    trainer.log(rehearsal_report(cfg, trainer.world, memory, seconds))


def main(argv=None) -> None:
    args = parse_args(argv)
    cfg = load_config(args.config_path, args.overrides + ([f"train.steps={args.max_steps}"] if args.max_steps else []))
    if not args.rehearse:
        check_inputs(cfg)
    if not args.resume:  # before the weights are read (the trainer checks again)
        runs.check_fresh(repo_path(cfg.train.output_dir))
    d = cfg.distill
    world = distributed.init()
    memory = MemoryLog(world.device)
    accumulation_steps(cfg, world.size)  # a total batch that does not divide fails here
    check_memory(cfg, world, args.rehearse)

    # 1. models: generator and critic are trained (DeepSpeed places them), the teacher is frozen and
    # placed by distill.teacher_sharding
    generator, critic, teacher = build_models(cfg, world, args.rehearse)
    base = with_adapters(cfg, generator, critic, keep=world.is_main)
    ema = EMA(d.ema_decay, d.ema_start, keep=world.is_main, base=base)
    adapted = cfg.lora.rank > 0  # the EMA is an adapter's, small: in extra.pt; else model.pt's generator_ema
    trainer = Trainer(cfg, {"generator": generator, "critic": (critic, d.critic_lr)}, resume=args.resume,
                      extra={"ema": ema} if adapted else None,
                      on_save=lambda folder: write_model_pt(folder, trainer, ema),  # runs once `trainer` exists
                      on_load=None if adapted else lambda folder: read_ema(folder, ema), world=world)
    memory.mark("generator and critic")
    teacher = frozen(teacher, cfg, world, d.teacher_sharding)
    memory.mark(f"teacher ({d.teacher_sharding})")

    # 2. data: prompts for the rollouts, teacher trajectories for the forward-KL term
    bank = prompt_bank(cfg, world.device, args.rehearse)
    memory.mark("text encoder")
    prompts = dmd_prompts(cfg, args.rehearse)
    distillation = Distillation(cfg, trainer, generator, critic, teacher, ema, bank, prompts,
                                trajectory_source(cfg, args.rehearse))

    # 3. the iterations (hiar.distill.Distillation), checkpoints by the trainer
    if args.rehearse:
        rehearse(cfg, trainer, distillation, memory)
        return
    trainer.fit(distillation.iteration, distillation.sample)
    distillation.export()


if __name__ == "__main__":
    main_guard(main)
