"""Distil the causal student with DMD on its own rollouts, in step-first order (HiAR) or block-first
order (the Self-Forcing baseline), plus the forward-KL regulariser (DESIGN.md section 2).

    deepspeed train/distill.py --config_path configs/toy/hiar.yaml
    torchrun --nproc_per_node=8 train/distill.py --config_path configs/hiar.yaml
    python train/distill.py --config_path configs/toy/hiar.yaml --resume --max_steps 200

Two trained models, the generator (causal student, from distill.generator) and the critic (fake score,
from distill.critic), and a frozen teacher (real score, distill.teacher, CFG against
train.negative_prompt). Every iteration updates the critic; every distill.dfake_gen_update_ratio-th
also the generator. Checkpoints (checkpoints/step-N/) hold both DeepSpeed states and model.pt
({generator, generator_ema, critic, step, config}: what `inference.py --checkpoint_path ... --use_ema`
loads, and where --resume finds the EMA); the final generator (its EMA once started) is exported as
model.safetensors.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from hiar.checkpoints import load_generator  # noqa: E402
from hiar.codecs import build_codec  # noqa: E402
from hiar.config import Config, config_to_dict, load_config  # noqa: E402
from hiar.data import PromptSource  # noqa: E402
from hiar.distill import DMD, exit_step, forward_kl_loss, self_rollout  # noqa: E402
from hiar.ode import TrajectoryStore, trajectory_batch  # noqa: E402
from hiar.pipeline import render  # noqa: E402
from hiar.sampling import block_noise, generate, stable_hash  # noqa: E402
from hiar.text import build_text_encoder  # noqa: E402
from hiar.toytrain import PromptBank  # noqa: E402
from hiar.training import EMA, Trainer, gathered, main_guard  # noqa: E402

DMD_PROMPT_SEED = 2_000_003  # toyworld prompts for DMD: captions of clips no earlier stage used


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config_path", default="configs/toy/hiar.yaml")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    p.add_argument("--max_steps", type=int, help="train this many steps in all (sets train.steps)")
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


def main(argv=None) -> None:
    args = parse_args(argv)
    cfg = load_config(args.config_path, args.overrides + ([f"train.steps={args.max_steps}"] if args.max_steps else []))
    check_inputs(cfg)
    d, t, k = cfg.distill, cfg.train, cfg.video.frames_per_block

    # 1. models: generator and critic are trained, the teacher is frozen (it may be larger: teacher_model)
    generator, _ = load_generator(d.generator, cfg)
    critic, _ = load_generator(d.critic, cfg)
    teacher_cfg = dataclasses.replace(cfg, model=load_config(d.teacher_model).model) if d.teacher_model else cfg
    teacher, _ = load_generator(d.teacher, teacher_cfg)
    ema = EMA(d.ema_decay, d.ema_start)

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
        blob = torch.load(folder / "model.pt", map_location="cpu", mmap=True, weights_only=True)
        if "generator_ema" in blob:  # absent before distill.ema_start
            ema.load_state_dict({"shadow": {k: v.clone() for k, v in blob["generator_ema"].items()}})

    trainer = Trainer(cfg, {"generator": generator, "critic": (critic, d.critic_lr)}, resume=args.resume,
                      on_save=write_weights, on_load=read_ema)
    device = next(generator.parameters()).device
    teacher.requires_grad_(False).eval().to(device)

    # 2. data: prompts for the rollouts, teacher trajectories for the forward-KL term
    bank = PromptBank(build_text_encoder(cfg))
    prompts = PromptSource(d.prompts, DMD_PROMPT_SEED, cfg.video.height, cfg.video.width, ROOT)
    trajectories = TrajectoryStore(cfg.ode.output_dir) if d.fkl_weight > 0 else None
    dmd = DMD(teacher, bank([t.negative_prompt]).to(device), cfg)
    num_steps = len(cfg.schedule.denoising_steps)

    def rollout(text: torch.Tensor, ids: list[int], step: int, role: str, exit: int, grad: bool) -> torch.Tensor:
        # Own noise streams for the generator's and the critic's rollouts, a function of the step.
        noise = block_noise(cfg, stable_hash(t.seed, role, step) >> 1, ids, device)
        return self_rollout(generator, text, cfg, noise, exit, grad)

    # 3. one iteration: maybe a generator update, always a critic update
    def step_fn(step: int) -> dict[str, float]:
        ids = [(step * trainer.world + trainer.rank) * t.batch_size + i for i in range(t.batch_size)]
        captions = [prompts[i] for i in ids]
        text = bank(captions).to(device)
        exit = exit_step(t.seed, step, d.min_exit_step, num_steps)
        metrics: dict[str, float] = {"exit_step": exit}
        if step % d.dfake_gen_update_ratio == 0:
            x = rollout(text, ids, step, "generator", exit, grad=True)
            loss, info = dmd.generator_loss(x, text, critic)
            metrics.update(info, dmd_loss=loss.item())
            if trajectories is not None:
                batch = trajectory_batch(trajectories, t.batch_size, step, trainer.rank, trainer.world)
                fkl = forward_kl_loss(generator, {key: v.to(device) if torch.is_tensor(v) else v
                                                  for key, v in batch.items()}, bank(batch["captions"]).to(device), cfg)
                metrics["fkl_loss"] = fkl.item()
                loss = loss + d.fkl_weight * fkl
            metrics["generator_loss"] = trainer.optimize("generator", loss)
            metrics["generator_grad_norm"] = trainer.grad_norms.get("generator", float("nan"))
            ema.update(generator, step)
        with torch.no_grad():
            x = rollout(text, ids, step, "critic", exit, grad=False)
        metrics["critic_loss"] = trainer.optimize("critic", dmd.critic_loss(critic, x, text))
        metrics["critic_grad_norm"] = trainer.grad_norms.get("critic", float("nan"))
        return metrics

    codec = functools.cache(lambda: build_codec(cfg, device))  # built at the first sample video, once (Wan VAE)

    def on_sample(step: int) -> None:
        """Sample videos of the first prompts with the current generator, in the configured order."""
        if trainer.rank != 0:
            return
        captions = [prompts[i] for i in range(2)]
        folder = trainer.out / "samples"
        folder.mkdir(parents=True, exist_ok=True)
        paths = [folder / f"step-{step:08d}-{i}.mp4" for i in range(len(captions))]
        with torch.no_grad():
            blocks = generate(generator, bank(captions).to(device), cfg, block_noise(cfg, 0, range(len(captions)), device),
                              cfg.video.num_latent_frames // k)
            render(codec(), cfg, blocks, paths)
        trainer.log(f"samples: {', '.join(map(str, paths))}")

    trainer.fit(step_fn, on_sample)
    if trainer.step >= t.steps:
        trainer.log(f"model: {trainer.export(module=ema.averaged(generator))}")  # inference uses the EMA


if __name__ == "__main__":
    main_guard(main)
