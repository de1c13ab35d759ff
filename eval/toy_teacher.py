"""Does the toy teacher draw what its captions say? Samples held-out captions with CFG and measures them.

    python -m eval.toy_teacher --checkpoint runs/toy/teacher/model.safetensors --num_clips 40 --out docs/toy_teacher

A clip passes colour fidelity when the prompted background and every prompted object colour are
measured in at least half of its frames; it moves when every prompted object's median centroid step
lies within the world's speeds (0.75 to 2.5 px a frame, with a 0.25 px margin). Writes results.json
and a contact sheet (contact_sheet.png: six frames of the first eight clips).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from hiar.checkpoints import load_generator
from hiar.codecs import build_codec
from hiar.text import build_text_encoder
from hiar.toytrain import teacher_samples
from hiar.toyworld import caption_fidelity, sample_clip
from hiar.video import to_uint8

HELD_OUT_SEED = 424242  # captions of clips the teacher never trained on
SPEED_RANGE = (0.5, 2.75)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="runs/toy/teacher/model.safetensors")
    p.add_argument("--num_clips", type=int, default=40)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--out", default="docs/toy_teacher")
    args = p.parse_args(argv)
    model, cfg = load_generator(args.checkpoint)
    model.eval()
    codec, encoder = build_codec(cfg), build_text_encoder(cfg)
    captions = [sample_clip(HELD_OUT_SEED, i, cfg.video.height, cfg.video.width).caption for i in range(args.num_clips)]
    negative = encoder([cfg.train.negative_prompt])
    videos = []
    for start in range(0, len(captions), args.batch_size):
        x0 = teacher_samples(model, cfg, encoder(captions[start:start + args.batch_size]), negative, seed=start)
        videos += [to_uint8(v) for v in codec.decode(x0)]
    clips = []
    for caption, video in zip(captions, videos):
        f = caption_fidelity(video, caption)
        f["colours_ok"] = f["background"] >= 0.5 and f["objects"] >= 0.5
        f["moves"] = all(SPEED_RANGE[0] <= s <= SPEED_RANGE[1] for s in f["speed"].values())
        clips.append({"caption": caption, **f})
    result = {"checkpoint": args.checkpoint, "clips": len(clips),
              "colour_fidelity": float(np.mean([c["colours_ok"] for c in clips])),
              "moving": float(np.mean([c["moves"] for c in clips])), "per_clip": clips}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=1))
    import imageio.v3 as iio

    sheet = np.concatenate([np.concatenate(list(v[:: max(1, len(v) // 6)][:6]), axis=1) for v in videos[:8]], axis=0)
    iio.imwrite(out / "contact_sheet.png", sheet)
    print(f"colour fidelity {result['colour_fidelity']:.0%}, moving {result['moving']:.0%} of {len(clips)} clips; "
          f"wrote {out / 'results.json'} and {out / 'contact_sheet.png'}")
    return result


if __name__ == "__main__":
    main()
