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
model.safetensors. On CUDA the memory planner (hiar/plan.py) checks the run before any weights are read;
--rehearse swaps the weights, the text encoder and the data for random ones of the same sizes.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
import torch

from hiar import distributed, runs
from hiar.checkpoints import load_generator
from hiar.codecs import build_codec
from hiar.config import Config, config_to_dict, load_config
from hiar.data import PromptSource
from hiar.distill import DMD, exit_step, forward_kl_loss, rollout_blocks, self_rollout, window_loss_start
from hiar.trajectories import TrajectoryStore, trajectory_batch
from hiar.order import ShuffledOrder, updates_before
from hiar.render import render
from hiar.plan import check_fits, estimate
from hiar.rehearsal import MemoryLog, RandomTrajectories, RandomUMT5, random_wan, rehearsal_prompts
from hiar.sampling import block_noise, generate, stable_hash
from hiar.text import PromptBank
from hiar.training import EMA, Trainer, accumulation_steps, frozen, gathered, main_guard

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
    needed = {"distill.generator": d.generator, "distill.teacher": d.teacher, "distill.critic": d.critic}
    if d.prompts != "toyworld":
        needed["distill.prompts"] = str(Path(d.prompts) if Path(d.prompts).is_absolute() else ROOT / d.prompts)
    if d.fkl_weight > 0:
        needed["ode.output_dir (manifest.json of train/ode_pairs.py)"] = str(Path(cfg.ode.output_dir) / "manifest.json")
    missing = [f"{key}={path}" for key, path in needed.items() if not Path(path).exists()]
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


def main(argv=None) -> None:
    args = parse_args(argv)
    cfg = load_config(args.config_path, args.overrides + ([f"train.steps={args.max_steps}"] if args.max_steps else []))
    if not args.rehearse:
        check_inputs(cfg)
    if not args.resume:  # before the weights are read (the trainer checks again)
        runs.check_fresh(Path(cfg.train.output_dir))
    d, t, k = cfg.distill, cfg.train, cfg.video.frames_per_block
    world = distributed.init()
    memory = MemoryLog(world.device)
    accumulation = accumulation_steps(cfg, world.size)  # a total batch that does not divide fails here
    if world.device.type == "cuda":  # refuse a run that cannot fit before loading any weights
        capacity, per_node = torch.cuda.get_device_properties(world.device).total_memory, gpus_per_node()
        # a rehearsal measures what the planner estimates, so it runs even where the planner says no
        plan = estimate(cfg, world.size, capacity / 2**30, per_node) if args.rehearse else \
            check_fits(cfg, world.size, capacity, per_node)
        if world.is_main:
            print(plan.table())

    # 1. models: generator and critic are trained (DeepSpeed places them), the teacher is frozen (it
    # may be larger, teacher_model), in train.bf16's precision and placed by distill.teacher_sharding
    teacher_model = load_config(d.teacher_model).model if d.teacher_model else cfg.model
    teacher_dtype = torch.bfloat16 if t.bf16 else torch.float32
    if args.rehearse:  # built straight on the GPU: a 14B teacher in float32 on the host would take minutes
        generator, critic = random_wan(cfg.model), random_wan(cfg.model)
        teacher = random_wan(teacher_model, world.device, teacher_dtype)
    else:
        generator, _ = load_generator(d.generator, cfg)
        critic, _ = load_generator(d.critic, cfg)
        teacher, _ = load_generator(d.teacher, dataclasses.replace(cfg, model=teacher_model), dtype=teacher_dtype)
    ema = EMA(d.ema_decay, d.ema_start, keep=world.is_main)

    def write_weights(folder: Path) -> None:
        """model.pt: the layout HiAR / Self-Forcing checkpoints use, loadable by inference.py."""
        with gathered(trainer.engines["generator"].module), gathered(trainer.engines["critic"].module):
            if trainer.rank == 0:
                blob = {"generator": generator.state_dict(), "critic": critic.state_dict(), "step": trainer.step,
                        "config": config_to_dict(cfg)}
                if ema.shadow is not None:
                    blob["generator_ema"] = ema.shadow
                torch.save(blob, folder / "model.pt")

    def read_ema(folder: Path) -> None:
        """The EMA back from model.pt, its only copy (a 1.3B generator's is 5 GB); mmap reads only it."""
        blob = runs.load_weights_only(folder / "model.pt", map_location="cpu", mmap=True)
        ema.load_state_dict({"shadow": blob.get("generator_ema")})  # absent before distill.ema_start

    trainer = Trainer(cfg, {"generator": generator, "critic": (critic, d.critic_lr)}, resume=args.resume,
                      on_save=write_weights, on_load=read_ema, world=world)
    memory.mark("generator and critic")
    teacher = frozen(teacher, cfg, world, d.teacher_sharding)
    memory.mark(f"teacher ({d.teacher_sharding})")
    device = world.device

    # 2. data: prompts for the rollouts, teacher trajectories for the forward-KL term, each read in a
    # seeded order that is reshuffled every epoch and split over the ranks (hiar.order)
    if args.rehearse and cfg.model.text_encoder == "umt5-xxl":
        bank = PromptBank(RandomUMT5(cfg.model.text_len, device), t.prompt_cache_mb * 2**20, device)
    else:
        bank = PromptBank.for_config(cfg, device)
    memory.mark("text encoder")
    prompts = PromptSource(rehearsal_prompts() if args.rehearse else d.prompts, DMD_PROMPT_SEED, cfg.video.height,
                           cfg.video.width, ROOT)
    prompt_order = ShuffledOrder(prompts.size, t.seed, world.size, world.rank)
    if d.fkl_weight > 0:
        trajectories = RandomTrajectories(cfg) if args.rehearse else TrajectoryStore(cfg.ode.output_dir)
    else:
        trajectories = None
    trajectory_order = ShuffledOrder(len(trajectories), t.seed, world.size, world.rank) if trajectories else None
    dmd = DMD(teacher, bank([t.negative_prompt]), cfg)
    num_steps = len(cfg.schedule.denoising_steps)

    def prompt_draw(step: int, critic: bool, micro: int) -> int:
        """Every update reads fresh prompts: draws are numbered by the updates made before this one
        (the critic's every step, the generator's every dfake_gen_update_ratio-th, before the critic's)."""
        updates = step + updates_before(step, d.dfake_gen_update_ratio)
        if critic and step % d.dfake_gen_update_ratio == 0:
            updates += 1  # this step's generator update came first
        return updates * accumulation + micro

    codec = functools.cache(lambda: build_codec(cfg, device))  # built when first needed, once (Wan VAE)

    def rollout(ids: list[int], text: torch.Tensor, step: int, role: str, micro: int, exit: int,
                grad: bool) -> tuple[torch.Tensor, int]:
        """The sample and the number of frames in front of the window the loss leaves out."""
        # Own noise streams for the generator's and the critic's rollouts, a function of (step, micro-step);
        # the rollout's length (longer rollouts than the window) is drawn from the same key.
        noise = block_noise(cfg, stable_hash(t.seed, role, step, micro) >> 1, ids, device)
        num_blocks = rollout_blocks(noise.seed, cfg)
        loss_from = window_loss_start(cfg, num_blocks)  # > 0: the window's first frame is re-encoded
        x = self_rollout(generator, text, cfg, noise, exit, grad, num_blocks, codec() if loss_from else None)
        return x, loss_from

    # 3. one iteration: maybe a generator update, always a critic update, each over micro-steps
    def generator_loss(step: int, exit: int, micro: int) -> tuple[torch.Tensor, dict[str, float]]:
        ids = prompt_order.draw(prompt_draw(step, False, micro), t.batch_size)
        text = bank([prompts[i] for i in ids])
        x, loss_from = rollout(ids, text, step, "generator", micro, exit, grad=True)
        loss, metrics = dmd.generator_loss(x, text, critic, loss_from)
        metrics["dmd_loss"] = loss.item()
        if trajectories is not None:
            indices = trajectory_order.draw(step // d.dfake_gen_update_ratio * accumulation + micro, t.batch_size)
            batch = trajectory_batch(trajectories, indices)
            fkl = forward_kl_loss(generator, {key: v.to(device) if torch.is_tensor(v) else v for key, v in batch.items()},
                                  bank(batch["captions"]), cfg)
            metrics["fkl_loss"] = fkl.item()
            loss = loss + d.fkl_weight * fkl
        return loss, metrics

    def critic_loss(step: int, exit: int, micro: int) -> tuple[torch.Tensor, dict[str, float]]:
        ids = prompt_order.draw(prompt_draw(step, True, micro), t.batch_size)
        text = bank([prompts[i] for i in ids])
        with torch.no_grad():
            x, _ = rollout(ids, text, step, "critic", micro, exit, grad=False)  # the critic sees every frame
        return dmd.critic_loss(critic, x, text), {}

    def step_fn(step: int) -> dict[str, float]:
        exit = exit_step(t.seed, step, d.min_exit_step, num_steps)
        metrics: dict[str, float] = {"exit_step": exit}
        if step % d.dfake_gen_update_ratio == 0:
            update = trainer.optimize("generator", lambda micro: generator_loss(step, exit, micro))
            metrics.update({key if key.startswith(("dmd", "fkl")) else f"generator_{key}": v for key, v in update.items()})
            ema.update(generator, step)
        update = trainer.optimize("critic", lambda micro: critic_loss(step, exit, micro))
        metrics.update({f"critic_{key}": v for key, v in update.items()})
        return metrics

    def on_sample(step: int) -> None:
        """Sample videos of the first prompts with the current generator, in the configured order (under
        ZeRO-3 every rank runs the forwards, which gather parameters collectively; rank 0 writes)."""
        model = trainer.sampling_module("generator")
        if model is None:
            return
        captions = [prompts[i] for i in range(2)]
        with torch.no_grad():
            blocks = generate(model, bank(captions), cfg, block_noise(cfg, 0, range(len(captions)), device),
                              cfg.video.num_latent_frames // k)
            if not world.is_main:
                for _ in blocks:  # the same forwards as rank 0, nothing written
                    pass
                return
            folder = trainer.out / "samples"
            folder.mkdir(parents=True, exist_ok=True)
            paths = [folder / f"step-{step:08d}-{i}.mp4" for i in range(len(captions))]
            render(codec(), cfg, blocks, paths)
        trainer.log(f"samples: {', '.join(map(str, paths))}")

    if not args.rehearse:
        trainer.fit(step_fn, on_sample)
        if trainer.step >= t.steps:
            trainer.log(f"model: {trainer.export(name='generator', ema=ema)}")  # inference uses the EMA
        return
    seconds: dict[bool, list[float]] = {True: [], False: []}  # by whether the step updates the generator

    def timed_step(step: int) -> dict[str, float]:
        start = time.perf_counter()
        metrics = step_fn(step)
        if world.device.type == "cuda":
            torch.cuda.synchronize(world.device)
        if step > 0:  # step 0 pays for allocation and kernel selection
            seconds[step % d.dfake_gen_update_ratio == 0].append(time.perf_counter() - start)
        return metrics

    memory.start_steps()
    trainer.fit(timed_step)
    trainer.log(rehearsal_report(cfg, world, memory, seconds))


if __name__ == "__main__":
    main_guard(main)
