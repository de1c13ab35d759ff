"""Can the toy teacher learn the direction word at all? A diagnostic, not part of the recipe.

A world stripped to the one thing the word decides: a white circle (half-extent 7) on black, at 2.5 px
a frame, from a random position, moving one of the four directions; the caption names only the
direction ("a white circle moving left on a black background"). The toy teacher (6 latent frames of
the DCT codec, 1x1-latent tokens; 4 layers, dim 128) trains from scratch on it by flow matching
(`hiar.toyteacher.train_teacher`: configs/toy/teacher.yaml, batch 8, lr 3e-4, caption dropout 0.1, no
warm-up or decay), in one of two ways:

  frame_noise   half the samples with a noise level per latent frame (train.frame_noise=0.5)
  context       half the samples with the first latent frame nearly clean (train.context_noise=0.5:
                a level in [0, 0.2], the others at one level drawn as for every other sample)
  context_high  the same with the others' level mapped into [0.7, 1] (train.context_noise_min=0.7), so
                that their motion is barely legible and the caption has to say it

Every 250 steps it prints how much worse the flow error of frames 1-5 gets, with frame 0 given at level
0.05 and the others at 0.3, 0.6 and 0.9, when each caption's direction is reversed (48 fixed clips):
+0% means the word is ignored. At the end it samples 24 clips (each direction 6 times) with the
teacher's ODE (48 steps, shift 8, CFG 3): from pure noise, and continuing 24 rendered first frames
(`hiar.toyteacher.teacher_samples` with context), and reports the direction the tracker reads. The run
keeps its checkpoints under --out (default runs/diagnostic/direction_MODE); --resume continues it.

    .venv/bin/python scripts/direction_word_diagnostic.py context 2000        # about 20 min on one thread
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Sequence

import torch

from hiar.codecs import build_codec, rendered_frames
from hiar.config import load_config
from hiar.flow import FlowMatching
from hiar.text import PromptBank
from hiar.toyfidelity import prompt_fidelity, summarise
from hiar.toyteacher import encode_clips, flow_errors, teacher_samples, train_teacher
from hiar.toyworld import ToyClip, ToyObject
from hiar.video import to_uint8

OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}
MODES = {"frame_noise": ["train.frame_noise=0.5"], "context": ["train.context_noise=0.5"],
         "context_high": ["train.context_noise=0.5", "train.context_noise_min=0.7"]}
REPORT_EVERY = 250


def caption(direction: str) -> str:
    return f"a white circle moving {direction} on a black background"


def circle(index: int) -> ToyClip:
    """Clip `index` of the stripped world, a function of the index alone (so a resumed run draws the same)."""
    rng = random.Random(index)
    direction = rng.choice(list(OPPOSITE))
    x, y = rng.uniform(7, 57), rng.uniform(7, 57)
    return ToyClip("black", (ToyObject("circle", "white", 7.0, x, y, direction, 2.5),))


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=list(MODES))
    p.add_argument("steps", type=int)
    p.add_argument("--out", help="the run folder (default runs/diagnostic/direction_MODE)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    args = p.parse_args(argv)
    cfg = load_config("configs/toy/teacher.yaml", [
        "video.num_latent_frames=6", "model.patch_size=[1,1,1]", "train.frame_noise=0", "train.context_noise=0",
        *MODES[args.mode], f"train.steps={args.steps}", "train.warmup_steps=0", "train.decay_steps=0",
        f"train.sample_every={REPORT_EVERY}", f"train.save_every={REPORT_EVERY}",
        f"train.output_dir={args.out or f'runs/diagnostic/direction_{args.mode}'}"])
    codec, bank = build_codec(cfg, "cpu"), PromptBank.for_config(cfg, "cpu")
    frames = rendered_frames(cfg)

    def batch(indices: Sequence[int]) -> tuple[torch.Tensor, list[str]]:
        drawn = [circle(i) for i in indices]
        return encode_clips(codec, drawn, frames), [caption(c.objects[0].direction) for c in drawn]

    probe = [circle(i) for i in range(10**6, 10**6 + 48)]  # indices a run of under 10**5 steps never draws
    probe_x0 = encode_clips(codec, probe, frames)
    probe_captions = [caption(c.objects[0].direction) for c in probe]
    reversed_captions = [caption(OPPOSITE[c.objects[0].direction]) for c in probe]
    probe_noise = torch.randn(probe_x0.shape, generator=torch.Generator().manual_seed(1))
    flow = FlowMatching(cfg.train.timestep_shift)

    @torch.no_grad()
    def report_reversal_penalty(model: torch.nn.Module, step: int) -> None:
        penalty = {}
        for level in (0.3, 0.6, 0.9):
            sigma = torch.full(probe_x0.shape[:2], level)
            sigma[:, 0] = 0.05
            right, wrong = (flow_errors(model, probe_x0, bank(captions), flow, sigma, probe_noise,
                                        scored=slice(1, None)).mean().item()
                            for captions in (probe_captions, reversed_captions))
            penalty[level] = round(100 * (wrong / right - 1), 2)
        print(f"{step}: reversed-direction penalty % {penalty}", flush=True)

    model = train_teacher(cfg, resume=args.resume, batch=batch, on_sample=report_reversal_penalty).eval()
    dirs = list(OPPOSITE) * 6
    text, negative = bank([caption(d) for d in dirs]), bank([cfg.train.negative_prompt])
    first, _ = batch(range(2 * 10**6, 2 * 10**6 + 24))
    for name, context in (("from noise", None), ("from a rendered first frame", first[:, :1])):
        x0 = teacher_samples(model, cfg, text, negative, seed=0, context=context)
        r = summarise([prompt_fidelity(to_uint8(v), caption(d)) for v, d in zip(codec.decode(x0), dirs)])
        print(f"sampled {name}: direction {r['direction']:.0%} ({r['direction_of_moving']:.0%} of moving), "
              f"colour {r['colour']:.0%}, shape {r['shape']:.0%}")


if __name__ == "__main__":
    main()
