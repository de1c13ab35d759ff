"""Train the toy world's bidirectional teacher by flow matching (with caption dropout for CFG).

    deepspeed train/teacher.py --config_path configs/toy/teacher.yaml
    python train/teacher.py --config_path configs/toy/teacher.yaml --resume      # one process

Writes checkpoints/, samples/ and, at the end, model.safetensors under train.output_dir.
"""

from __future__ import annotations

import argparse

from hiar import distributed
from hiar.codecs import build_codec
from hiar.config import load_config, repo_path
from hiar.data import load_prompts
from hiar.flow import FlowMatching
from hiar.models import WanModel
from hiar.order import ShuffledOrder
from hiar.text import PromptBank
from hiar.toyteacher import drop_captions, flow_matching_loss, toy_batch, write_teacher_samples
from hiar.training import EMA, Trainer, main_guard, seed_step


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config_path", default="configs/toy/teacher.yaml")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    p.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    return p.parse_intermixed_args(argv)  # options may follow the section.key=value overrides


def main(argv=None) -> None:
    args = parse_args(argv)
    cfg = load_config(args.config_path, args.overrides)
    world = distributed.init()
    codec, bank = build_codec(cfg, world.device), PromptBank.for_config(cfg, world.device)
    flow = FlowMatching(cfg.train.timestep_shift)
    seed_step(cfg.train.seed, step=-1, rank=0)  # the initial weights, identical on every rank and run
    t = cfg.train
    ema = EMA(t.ema_decay, t.ema_start, keep=world.is_main) if t.ema_decay else None
    trainer = Trainer(cfg, WanModel(cfg.model), resume=args.resume, extra={"ema": ema} if ema else None, world=world)
    clips = ShuffledOrder(None, t.seed, world.size, world.rank)  # the toy world is an endless stream of clips
    prompts = load_prompts(repo_path(cfg.runtime.prompts))[:2]

    def micro_loss(step: int, micro: int):
        x0, captions = toy_batch(cfg, codec, clips.draw(step * trainer.accumulation + micro, t.batch_size))
        text = bank(drop_captions(captions, t.caption_dropout, t.negative_prompt))
        return flow_matching_loss(trainer.engine, x0.to(world.device), text, flow, frame_noise=t.frame_noise,
                                  context_noise=t.context_noise)

    def step_fn(step):
        metrics = trainer.update(lambda micro: micro_loss(step, micro))
        if ema is not None:
            ema.update(trainer.model, step)
        return metrics

    def on_sample(step):
        model = trainer.sampling_module(ema=ema)
        if model is not None:
            paths = write_teacher_samples(model, codec, bank, cfg, prompts, trainer.out / "samples", f"step-{step:08d}",
                                          write=world.is_main)
            for path in paths:
                trainer.log(f"sample: {path}")

    trainer.fit(step_fn, on_sample)
    if trainer.step >= cfg.train.steps:
        trainer.log(f"model: {trainer.export(ema=ema)}")


if __name__ == "__main__":
    main_guard(main)
