"""Can the toy teacher learn the direction word at all, and tie each to its object? A diagnostic, not part
of the recipe.

Two worlds stripped to what the words decide (`--world`), on black, objects of half-extent 7 at 2.5 px a
frame from random positions:

  circle  one white circle moving one of the four directions: the caption names only the direction
          ("a white circle moving left on a black background")
  pair    two circles of two of the palette's colours moving two different directions: only the colour
          says whose direction is whose ("a red circle moving left and a blue circle moving up ...")

captioned in the template or in the training generator's varied phrasings (`--captions`). The toy
teacher (6 latent frames of the DCT codec, 1x1-latent tokens; 4 layers, dim 128) trains from scratch on
it by flow matching (`hiar.toyteacher.train_teacher`: configs/toy/teacher.yaml, batch 8, lr 3e-4,
caption dropout 0.1, no warm-up or decay), in one of these ways:

  frame_noise   half the samples with a noise level per latent frame (train.frame_noise=0.5)
  context       half the samples with the first latent frame nearly clean (train.context_noise=0.5:
                a level in [0, 0.2], the others at one level drawn as for every other sample)
  context_high  the same with the others' level mapped into [0.7, 1] (train.context_noise_min=0.7), so
                that their motion is barely legible and the caption has to say it

Every 250 steps it prints how much worse the flow error of frames 1-5 gets, with frame 0 given at level
0.05 and the others at 0.3, 0.6 and 0.9, when each caption's directions are reversed (48 fixed clips):
+0% means the word is ignored. In the pair world it prints beside it the penalty for exchanging the two
objects' directions ("swapped": the same words, bound the other way round; `hiar.captions.redirected`
keeps every other character): a model that moves both objects by the caption's directions as a set,
not each by its own, pays for the reversal and not for the exchange. At the end it samples 24 clips
with the teacher's ODE (48 steps, shift 8, CFG 3): from pure noise, and continuing 24 rendered first
frames (`hiar.toyteacher.teacher_samples` with context), and reports the direction the tracker reads
(in the pair world also of the wrong ones, the share that went the other object's way). The run keeps
its checkpoints under --out (default runs/diagnostic/direction_MODE, with _pair and _varied appended
for those options); --resume continues it.

    .venv/bin/python scripts/direction_word_diagnostic.py context_high 2000        # about 20 min on one thread
    .venv/bin/python scripts/direction_word_diagnostic.py context_high 3000 --world pair --captions varied
"""

from __future__ import annotations

import argparse
import dataclasses
import random
from collections.abc import Callable, Sequence

import torch

from hiar.captions import phrase, redirected
from hiar.codecs import build_codec, rendered_frames
from hiar.config import load_config
from hiar.flow import FlowMatching
from hiar.text import PromptBank
from hiar.toyfidelity import prompt_fidelity, summarise
from hiar.toyteacher import encode_clips, flow_errors, teacher_samples, train_teacher
from hiar.toywords import OPPOSITE, changed, swapped
from hiar.toyworld import OBJECT_COLOURS, ToyClip, ToyObject
from hiar.video import to_uint8

MODES = {"frame_noise": ["train.frame_noise=0.5"], "context": ["train.context_noise=0.5"],
         "context_high": ["train.context_noise=0.5", "train.context_noise_min=0.7"]}
REPORT_EVERY = 250


def circle(index: int) -> ToyClip:
    """Clip `index` of the stripped world, a function of the index alone (so a resumed run draws the same)."""
    rng = random.Random(index)
    direction = rng.choice(list(OPPOSITE))
    x, y = rng.uniform(7, 57), rng.uniform(7, 57)
    return ToyClip("black", (ToyObject("circle", "white", 7.0, x, y, direction, 2.5),))


def pair(index: int) -> ToyClip:
    """Clip `index` of the two-circle world: two colours, two different directions."""
    rng = random.Random(f"pair/{index}")
    colours, directions = rng.sample(sorted(OBJECT_COLOURS), 2), rng.sample(list(OPPOSITE), 2)
    return ToyClip("black", tuple(ToyObject("circle", c, 7.0, rng.uniform(7, 57), rng.uniform(7, 57), d, 2.5)
                                  for c, d in zip(colours, directions)))


WORLDS: dict[str, Callable[[int], ToyClip]] = {"circle": circle, "pair": pair}


def sampled_clips(world: str) -> list[ToyClip]:
    """The 24 clips sampled at the end (their first frames and captions); the circle world's go each
    direction six times."""
    clips = [WORLDS[world](i) for i in range(2 * 10**6, 2 * 10**6 + 24)]
    if world == "circle":
        clips = [dataclasses.replace(c, objects=(dataclasses.replace(c.objects[0], direction=d),))
                 for c, d in zip(clips, list(OPPOSITE) * 6)]
    return clips


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=list(MODES))
    p.add_argument("steps", type=int)
    p.add_argument("--world", choices=list(WORLDS), default="circle")
    p.add_argument("--captions", choices=["template", "varied"], default="template")
    p.add_argument("--out", help="the run folder (default runs/diagnostic/direction_MODE[_pair][_varied])")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    args = p.parse_args(argv)
    suffix = "".join(f"_{o}" for o in (args.world, args.captions) if o not in ("circle", "template"))
    cfg = load_config("configs/toy/teacher.yaml", [
        "video.num_latent_frames=6", "model.patch_size=[1,1,1]", "train.frame_noise=0", "train.context_noise=0",
        *MODES[args.mode], f"train.steps={args.steps}", "train.warmup_steps=0", "train.decay_steps=0",
        f"train.sample_every={REPORT_EVERY}", f"train.save_every={REPORT_EVERY}",
        f"train.output_dir={args.out or f'runs/diagnostic/direction_{args.mode}{suffix}'}"])
    codec, bank = build_codec(cfg, "cpu"), PromptBank.for_config(cfg, "cpu")
    frames, world = rendered_frames(cfg), WORLDS[args.world]

    def caption(clip: ToyClip, index: int) -> str:  # a function of the clip and its index alone
        return phrase(clip.spec(), args.captions, index)

    def batch(indices: Sequence[int]) -> tuple[torch.Tensor, list[str]]:
        drawn = [world(i) for i in indices]
        return encode_clips(codec, drawn, frames), [caption(c, i) for c, i in zip(drawn, indices)]

    probe_indices = range(10**6, 10**6 + 48)  # indices a run of under 10**5 steps never draws
    probe_x0, probe_captions = batch(probe_indices)
    specs = [world(i).spec() for i in probe_indices]
    # the probe's captions with the scene's directions changed as eval.toy_words changes them, and no other word
    variants = {"reversed": lambda spec: changed(spec, "direction")}
    if args.world == "pair":
        variants["swapped"] = swapped
    altered = {name: [redirected(c, [o["direction"] for o in variant(s)["objects"]])
                      for c, s in zip(probe_captions, specs)]
               for name, variant in variants.items()}
    probe_noise = torch.randn(probe_x0.shape, generator=torch.Generator().manual_seed(1))
    flow = FlowMatching(cfg.train.timestep_shift)

    @torch.no_grad()
    def report_penalties(model: torch.nn.Module, step: int) -> None:
        penalty = {name: {} for name in altered}
        for level in (0.3, 0.6, 0.9):
            sigma = torch.full(probe_x0.shape[:2], level)
            sigma[:, 0] = 0.05

            def error(captions: list[str]) -> float:
                return flow_errors(model, probe_x0, bank(captions), flow, sigma, probe_noise,
                                   scored=slice(1, None)).mean().item()

            right = error(probe_captions)
            for name, captions in altered.items():
                penalty[name][level] = round(100 * (error(captions) / right - 1), 2)
        print(f"{step}: " + "; ".join(f"{name}-direction penalty % {p}" for name, p in penalty.items()), flush=True)

    model = train_teacher(cfg, resume=args.resume, batch=batch, on_sample=report_penalties).eval()
    clips = sampled_clips(args.world)
    captions = [caption(c, i) for i, c in enumerate(clips)]
    text, negative = bank(captions), bank([cfg.train.negative_prompt])
    first = encode_clips(codec, clips, frames)[:, :1]
    for name, context in (("from noise", None), ("from a rendered first frame", first)):
        x0 = teacher_samples(model, cfg, text, negative, seed=0, context=context)
        r = summarise([prompt_fidelity(to_uint8(v), c) for v, c in zip(codec.decode(x0), captions)])
        bound = r["direction_by_scene"]
        pairs = (f", two ways {bound['two_ways']:.0%} (of the wrong, the other's way {bound['other_objects_way']:.0%})"
                 if args.world == "pair" else "")
        print(f"sampled {name}: direction {r['direction']:.0%} ({r['direction_of_moving']:.0%} of moving{pairs}), "
              f"colour {r['colour']:.0%}, shape {r['shape']:.0%}")


if __name__ == "__main__":
    main()
