"""Which words of its caption does a toy teacher use? No sampling: its flow-matching error on held-out
clips under their own captions and under captions with the colours, shapes, directions or background
changed (hiar/toywords.py).

    python -m eval.toy_words --checkpoint runs/toy/teacher_long/model.safetensors --out runs/toy/teacher_long/words.json

Prints, per kind of word, how much worse the clips' flow is predicted with that word changed (+0%: the
model ignores the word; beside it, no caption at all, and the frames shuffled: does the model know time)
and the errors by noise level; writes them to --out as JSON. With --context N the first N latent frames
are given nearly clean and the rest scored: does the model use the words to say where what it has seen
goes next? A missing checkpoint or a --context that leaves no frame to score ends it with one line and
exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from hiar.atomic import atomic_path
from hiar.checkpoints import load_generator
from hiar.codecs import build_codec, rendered_frames
from hiar.text import PromptBank
from hiar.toyfidelity import held_out_clips
from hiar.toywords import word_use


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="runs/toy/teacher_long/model.safetensors")
    p.add_argument("--num_clips", type=int, default=64)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--context", type=int, default=0,
                   help="latent frames given nearly clean, the rest scored (hiar/toywords.py; default: none)")
    p.add_argument("--out", default=None, help="JSON file for the result (default: print only)")
    p.add_argument("--device", default="cpu", help="where the model and the text encoder run (default: cpu)")
    args = p.parse_args(argv)
    if not Path(args.checkpoint).exists():  # a file, or a run's checkpoints/step-N/ folder
        print(f"error: --checkpoint {args.checkpoint} does not exist: train it first (launch/reproduce_toy.sh)",
              file=sys.stderr)
        sys.exit(2)
    model, cfg = load_generator(args.checkpoint)
    if not 0 <= args.context < cfg.video.num_latent_frames:
        print(f"error: --context {args.context}: the model's clips have {cfg.video.num_latent_frames} latent "
              "frames, and at least one must be scored", file=sys.stderr)
        sys.exit(2)
    device = torch.device(args.device)
    model.eval().to(device)
    clips = held_out_clips(args.num_clips, cfg.video.height, cfg.video.width, motion=cfg.video.toy_motion)
    codec = build_codec(cfg, torch.device("cpu"))  # encodes on the host; word_use moves the latents
    result = word_use(model, codec, PromptBank.for_config(cfg, device), clips, rendered_frames(cfg),
                      cfg.train.negative_prompt, batch_size=args.batch_size, context=args.context)
    result["checkpoint"] = args.checkpoint
    print("flow error with the word changed, against the clip's own caption: "
          + ", ".join(f"{k} {v:+.1%}" for k, v in result["penalty"].items())
          + " (none: no caption; shuffled: the clips' frames out of order; swapped: two objects' directions "
          f"exchanged, and direction_two_ways: both reversed, on the {result['two_way_clips']} clips whose "
          "objects go two ways)")
    for i, level in enumerate(result["levels"]):
        print(f"  sigma {level}: " + ", ".join(f"{name} {e[i]:.4f}" for name, e in result["error"].items()))
    if args.out:
        with atomic_path(args.out) as tmp:
            tmp.write_text(json.dumps(result, indent=1))
        print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
