"""Can the toy teacher learn the direction word at all? A diagnostic, not part of the recipe.

A world stripped to the one thing the word decides: a white circle (half-extent 7) on black, at 2.5 px
a frame, from a random position, moving one of the four directions; the caption names only the
direction ("a white circle moving left on a black background"). The `toy` teacher (6 latent frames of
the DCT codec, 1x1-latent tokens; 4 layers, dim 128) trains from scratch on it by flow matching, batch
8, lr 3e-4, caption dropout 0.1, in one of two ways:

  frame_noise   half the samples with a noise level per latent frame (train.frame_noise=0.5)
  context       half the samples with the first latent frame nearly clean (a level in [0, 0.2]) and the
                others at one level in [0.7, 1] (what train.context_noise does, with the others' level
                drawn as for every other sample)

Every 250 steps it prints how much worse the flow error of frames 1-5 gets, with frame 0 given at level
0.05 and the others at 0.3, 0.6 and 0.9, when each caption's direction is reversed (48 fixed clips):
+0% means the word is ignored. At the end it samples 24 clips (each direction 6 times) with the
teacher's ODE (48 steps, shift 8, CFG 3): from pure noise, and continuing 24 rendered first frames
(`hiar.toyteacher.teacher_samples` with context), and reports the direction the tracker reads.

    .venv/bin/python scripts/direction_word_diagnostic.py context 2000        # about 20 min on one thread
"""

from __future__ import annotations

import random
import sys
import time

import torch

from hiar.codecs import build_codec, rendered_frames
from hiar.config import load_config
from hiar.flow import FlowMatching
from hiar.models import WanModel
from hiar.text import PromptBank
from hiar.toyfidelity import prompt_fidelity, summarise
from hiar.toyteacher import encode_clips, flow_errors, flow_matching_loss, teacher_samples
from hiar.toyworld import ToyClip, ToyObject
from hiar.video import to_uint8

OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}


def caption(direction: str) -> str:
    return f"a white circle moving {direction} on a black background"


def clips(rng: random.Random, n: int) -> list[ToyClip]:
    drawn = []
    for _ in range(n):
        direction = rng.choice(list(OPPOSITE))
        drawn.append(ToyClip("black", (ToyObject("circle", "white", 7.0, rng.uniform(7, 57), rng.uniform(7, 57),
                                                  direction, 2.5),)))
    return drawn


def main(mode: str, steps: int) -> None:
    cfg = load_config("configs/toy/teacher.yaml", ["video.num_latent_frames=6", "model.patch_size=[1,1,1]"])
    torch.manual_seed(0)
    random.seed(0)  # caption dropout (the run quoted in docs/toy_prompts.md left it unseeded)
    codec, bank = build_codec(cfg, "cpu"), PromptBank.for_config(cfg, "cpu")
    flow = FlowMatching(cfg.train.timestep_shift)
    model = WanModel(cfg.model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.01)
    frames = rendered_frames(cfg)

    def batch(rng: random.Random, n: int) -> tuple[torch.Tensor, list[str]]:
        drawn = clips(rng, n)
        return encode_clips(codec, drawn, frames), [c.objects[0].direction for c in drawn]

    probe_x0, probe_dirs = batch(random.Random(12345), 48)
    probe_noise = torch.randn(probe_x0.shape, generator=torch.Generator().manual_seed(1))

    @torch.no_grad()
    def reversal_penalty() -> dict[float, float]:
        out = {}
        for level in (0.3, 0.6, 0.9):
            sigma = torch.full(probe_x0.shape[:2], level)
            sigma[:, 0] = 0.05
            right, wrong = (flow_errors(model, probe_x0, bank([caption(d) for d in dirs]), flow, sigma, probe_noise,
                                        scored=slice(1, None)).mean().item()
                            for dirs in (probe_dirs, [OPPOSITE[d] for d in probe_dirs]))
            out[level] = round(100 * (wrong / right - 1), 2)
        return out

    rng, start = random.Random(0), time.time()
    for step in range(1, steps + 1):
        x0, dirs = batch(rng, 8)
        text = bank([caption(d) if random.random() > 0.1 else "" for d in dirs])
        if mode == "context":
            sigma = flow.shifted(torch.rand(x0.shape[0]))[:, None].repeat(1, x0.shape[1])
            given = torch.rand(x0.shape[0]) < 0.5
            sigma[given, 0] = 0.2 * torch.rand(int(given.sum()))
            sigma[given, 1:] = (0.7 + 0.3 * torch.rand(int(given.sum())))[:, None]
            loss = flow_errors(model, x0, text, flow, sigma, torch.randn_like(x0)).mean()
        else:
            loss = flow_matching_loss(model, x0, text, flow, frame_noise=0.5)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % 250 == 0 or step == steps:
            print(f"{step} {time.time() - start:.0f}s loss {loss.item():.4f} reversed-direction penalty % "
                  f"{reversal_penalty()}", flush=True)

    model.eval()
    dirs = list(OPPOSITE) * 6
    text, negative = bank([caption(d) for d in dirs]), bank([cfg.train.negative_prompt])
    first, _ = batch(random.Random(99), 24)
    for name, context in (("from noise", None), ("from a rendered first frame", first[:, :1])):
        x0 = teacher_samples(model, cfg, text, negative, seed=0, context=context)
        r = summarise([prompt_fidelity(to_uint8(v), caption(d)) for v, d in zip(codec.decode(x0), dirs)])
        print(f"sampled {name}: direction {r['direction']:.0%} ({r['direction_of_moving']:.0%} of moving), "
              f"colour {r['colour']:.0%}, shape {r['shape']:.0%}")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
