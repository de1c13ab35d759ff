"""Does a toy model draw what its captions say? Samples held-out captions and measures every frame.

    python -m eval.toy_fidelity --checkpoint runs/toy/teacher/model.safetensors --sampler teacher --out docs/toy_teacher
    python -m eval.toy_fidelity --checkpoint runs/toy/hiar/model.safetensors --out runs/toy/hiar/fidelity
    python -m eval.toy_fidelity --checkpoint runs/toy/self_forcing/model.safetensors sampling.method=frame_first

`--sampler codec`: no model, the held-out clips themselves through the toy codec (of the checkpoint's
config): the ceiling every model is measured against. `--sampler teacher`: the bidirectional teacher's
ODE with CFG (train.sample_steps, train.sample_shift, train.guidance_scale of the checkpoint's config).
`--sampler student` (default): the causal student in its config's order (trailing section.key=value
overrides change it), one video of the config's length. A clip passes colour fidelity and moves as
`hiar.toyworld.fidelity_verdict` says. Writes results.json and contact_sheet.png (six frames of the first
eight clips). A missing checkpoint or a bad override ends it with one line and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

import torch

from hiar.atomic import atomic_path
from hiar.checkpoints import CheckpointError, checkpoint_config, load_generator
from hiar.config import ConfigError, with_overrides
from hiar.codecs import build_codec
from hiar.text import build_text_encoder
from hiar.sampling import block_noise, sample_video
from hiar.toyteacher import teacher_samples
from hiar.toyworld import caption_fidelity, clip_to_video, fidelity_verdict, sample_clip, speed_census
from hiar.video import to_uint8

HELD_OUT_SEED = 424242  # captions of clips the teacher never trained on


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="runs/toy/teacher/model.safetensors")
    p.add_argument("--num_clips", type=int, default=40)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--sampler", choices=["student", "teacher", "codec"], default="student")
    p.add_argument("--out", default="runs/toy/fidelity")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides (student sampler)")
    args = p.parse_args(argv)
    if not Path(args.checkpoint).is_file():
        raise ValueError(f"--checkpoint {args.checkpoint} does not exist: train it first (launch/reproduce_toy.sh) or "
                         "give another")
    if args.num_clips < 1 or args.batch_size < 1:
        raise ValueError("--num_clips and --batch_size must be at least 1")
    cfg = with_overrides(checkpoint_config(args.checkpoint), args.overrides)  # the checkpoint's own, overridden
    model, cfg = load_generator(args.checkpoint, cfg)
    model.eval()
    codec, encoder = build_codec(cfg), build_text_encoder(cfg)
    held_out = [sample_clip(HELD_OUT_SEED, i, cfg.video.height, cfg.video.width) for i in range(args.num_clips)]
    captions = [clip.caption for clip in held_out]
    negative = encoder([cfg.train.negative_prompt])
    videos = []
    for start in range(0, len(captions), args.batch_size):
        text = encoder(captions[start:start + args.batch_size])
        if args.sampler == "codec":  # the toy codec is frame-wise: one latent frame a video frame
            x0 = codec.encode(torch.stack([torch.from_numpy(clip_to_video(clip.render(cfg.video.num_latent_frames)))
                                           for clip in held_out[start:start + args.batch_size]]))
        elif args.sampler == "teacher":
            x0 = teacher_samples(model, cfg, text, negative, seed=start)
        else:
            with torch.no_grad():
                noise = block_noise(cfg, 0, range(start, start + len(text)))
                x0 = sample_video(model, text, cfg, noise, cfg.video.num_latent_frames // cfg.video.frames_per_block)
        videos += [to_uint8(v) for v in codec.decode(x0)]
    clips = []
    for caption, video in zip(captions, videos):
        f = caption_fidelity(video, caption)
        clips.append({"caption": caption, **f, **fidelity_verdict(f)})
    result = {"checkpoint": args.checkpoint, "sampler": args.sampler, "overrides": args.overrides, "clips": len(clips),
              "colour_fidelity": float(np.mean([c["colours_ok"] for c in clips])),
              "moving": float(np.mean([c["moves"] for c in clips])),
              "object_speeds": speed_census([s for c in clips for s in c["speed"].values()]), "per_clip": clips}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "results.json") as tmp:
        tmp.write_text(json.dumps(result, indent=1))
    import imageio.v3 as iio

    sheet = np.concatenate([np.concatenate(list(v[:: max(1, len(v) // 6)][:6]), axis=1) for v in videos[:8]], axis=0)
    with atomic_path(out / "contact_sheet.png") as tmp:
        iio.imwrite(tmp, sheet, extension=".png")
    census = ", ".join(f"{k} {v:.0%}" for k, v in result["object_speeds"].items())
    print(f"colour fidelity {result['colour_fidelity']:.0%}, moving {result['moving']:.0%} of {len(clips)} clips "
          f"(objects' speeds: {census}); wrote {out / 'results.json'} and {out / 'contact_sheet.png'}")
    return result


def cli(argv=None) -> int:
    """main() as a program: bad input is one 'error: ...' line and exit code 2, not a traceback."""
    try:
        main(argv)
    except (CheckpointError, ConfigError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
