"""How fast a prompt switch takes effect on the toy default, per order and switch mode.

    python -m eval.steering --output_folder docs/steering

For each pair of toy prompts (old -> new background and object colour) the embedded default student
generates a video that switches at block `--switch_block`, in both orders (frame_first, timestep_first)
and both modes (new_blocks, recache). Every frame is measured by the toy world's palette segmentation:
per block after the switch, the share of frames whose background is nearer the new prompt's than the
old one's ("new bg") and whose largest object has the new colour ("new colour"). Writes
steering.json, steering.md (the table) and contact_sheet.png (one row a video, one frame a block).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from hiar.checkpoints import load_generator
from hiar.codecs import build_codec
from hiar.conditioning import Conditioning, Segment
from hiar.config import load_config, repo_path, with_overrides
from hiar.outputs import exit_code
from hiar.sampling import block_noise, sample_video
from hiar.text import build_text_encoder
from hiar.toyworld import BACKGROUNDS, measure_frame
from hiar.video import to_uint8

PAIRS = [  # (old prompt, new prompt, old background, new background, new object colour)
    ("a red circle moving left on a black background", "a blue circle moving left on a dark green background",
     "black", "dark green", "blue"),
    ("a yellow square moving right on a dark blue background",
     "a cyan square moving right on a dark purple background", "dark blue", "dark purple", "cyan"),
]


def measure(frames: np.ndarray, old_bg: str, new_bg: str, new_colour: str) -> dict[str, float]:
    """Shares of `frames` (uint8 [F, H, W, 3]) whose background is nearer the new prompt's than the old
    one's, and whose largest object has the new colour. The background is a frame's median colour: the
    students draw backgrounds darker than the palette, so nearest-palette labels would misread them."""
    backgrounds = np.median(frames.reshape(len(frames), -1, 3), axis=1)  # [F, 3]
    nearer_new = (np.linalg.norm(backgrounds - BACKGROUNDS[new_bg], axis=1)
                  < np.linalg.norm(backgrounds - BACKGROUNDS[old_bg], axis=1))
    colours = [measure_frame(f).objects for f in frames]
    return {"new bg": float(nearer_new.mean()),
            "new colour": float(np.mean([bool(o) and o[0].colour == new_colour for o in colours]))}


def run(args: argparse.Namespace) -> None:
    base = load_config(repo_path("configs/toy/hiar.yaml"))
    k = base.video.frames_per_block
    model, _ = load_generator(repo_path(base.runtime.checkpoint), base)
    encoder, codec = build_text_encoder(base), build_codec(base)
    results, sheet = [], []
    for order in ("frame_first", "timestep_first"):
        for mode in ("new_blocks", "recache"):
            cfg = with_overrides(base, [f"sampling.method={order}", f"sampling.switch={mode}",
                                        f"video.num_latent_frames={args.blocks * k}"])
            for old, new, old_bg, new_bg, colour in PAIRS:
                cond = Conditioning([Segment(0, encoder([old])), Segment(args.switch_block, encoder([new]))])
                with torch.no_grad():
                    latents = sample_video(model.eval(), cond, cfg, block_noise(cfg, args.seed, [0]), args.blocks)
                frames = to_uint8(codec.decode(latents)[0])  # [F, H, W, 3]
                per_block = [measure(frames[n * k:(n + 1) * k], old_bg, new_bg, colour)
                             for n in range(args.switch_block, args.blocks)]
                results.append({"order": order, "mode": mode, "old": old, "new": new, "per_block": per_block})
                sheet.append(np.concatenate([frames[n * k + k // 2] for n in range(args.blocks)], axis=1))
    write(Path(args.output_folder), results, sheet, args)


def write(folder: Path, results: list[dict], sheet: list[np.ndarray], args: argparse.Namespace) -> None:
    import imageio.v3 as iio

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "steering.json").write_text(json.dumps({"settings": vars(args), "videos": results}, indent=1))
    iio.imwrite(folder / "contact_sheet.png", np.concatenate(sheet, axis=0))
    lines = [f"Switch at block {args.switch_block} of {args.blocks} (toy default, seed {args.seed}); mean over "
             f"{len(PAIRS)} prompt pairs; columns: blocks after the switch (0 = the first block of the new prompt).",
             "", "| order | mode | measure | " + " | ".join(str(i) for i in range(args.blocks - args.switch_block)) + " |",
             "|---|---|---|" + "---|" * (args.blocks - args.switch_block)]
    for order in ("frame_first", "timestep_first"):
        for mode in ("new_blocks", "recache"):
            runs = [r for r in results if r["order"] == order and r["mode"] == mode]
            for key in ("new bg", "new colour"):
                row = [np.mean([r["per_block"][i][key] for r in runs]) for i in range(len(runs[0]["per_block"]))]
                lines.append(f"| {order} | {mode} | {key} | " + " | ".join(f"{v:.2f}" for v in row) + " |")
    (folder / "steering.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output_folder", default="runs/steering")
    p.add_argument("--blocks", type=int, default=10)
    p.add_argument("--switch_block", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if not 0 < args.switch_block < args.blocks:
        print(f"error: --switch_block must lie in 1..{args.blocks - 1}", file=sys.stderr)
        return 2
    return exit_code(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
