"""How fast a prompt switch takes effect, and how smoothly a continuation starts, on the toy default.

    python -m eval.steering --output_folder docs/steering --overwrite

Switches. For each pair of toy prompts (a new background, a new object colour, both, a new shape) and
each of `--samples` noise samples, the embedded default student generates, in both orders (frame_first,
timestep_first), the unswitched video of the old prompt, the unswitched video of the new prompt, and the
video that switches at block `--switch_block` in each mode (new_blocks, recache), all from the same cell
noise. Every frame is measured (`features`): its background (median colour) and its object (the pixels
far from the background; these prompts have one object) by mean colour, centroid and shape. A frame of
a switched video is compared with the same frame of both references: per block after the switch,
"share new" is the share of frames nearer the new prompt's video than the old one's, and "old
remaining" the mean of d_new / (d_new + d_old) (0: the new prompt's video, 1: the old prompt's).

Continuation. Toy clips with one object, rendered by the toy world and encoded by the toy codec, are
continued as inference.py --video does (their last W - k latent frames are the clean prefix) and as
--image does (their first frame). The object's jump in place and colour from the last given frame to
the first generated one is compared with the world's motion per frame and with the student's own
change from frame to frame inside what it generated.

Writes steering.json (every number), steering.md (the tables) and contact_sheet.png.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from hiar.checkpoints import load_generator
from hiar.codecs import build_codec
from hiar.conditioning import Conditioning, Segment, context_latents
from hiar.config import Config, load_config, repo_path, with_overrides
from hiar.outputs import OVERWRITE_HELP, exit_code, new_file, refuse_existing
from hiar.sampling import block_noise, sample_video
from hiar.stream import Stream
from hiar.text import build_text_encoder
from hiar.toyworld import ToyClip, clip_to_video, sample_clip
from hiar.video import to_uint8

ORDERS = ("frame_first", "timestep_first")
MODES = ("new_blocks", "recache")
# name: (old prompt, new prompt, what the prompts differ in). "object place" is measured for every pair.
PAIRS = {
    "background": ("a red circle moving left on a black background",
                   "a red circle moving left on a dark blue background", ("background",)),
    "object colour": ("a yellow square moving right on a black background",
                      "a cyan square moving right on a black background", ("object colour",)),
    "both": ("a red circle moving left on a black background",
             "a blue circle moving left on a dark green background", ("background", "object colour")),
    "shape": ("a cyan circle moving left on a dark blue background",
              "a cyan triangle moving left on a dark blue background", ("object shape",)),
}
MEASURES = ("background", "object colour", "object shape", "object place")
FILES = ("steering.json", "steering.md", "contact_sheet.png")
# RGB distance from the frame's background beyond which a pixel is the object's: every object colour of
# the palette lies more than 150 from every background, and the students' edges are soft.
FOREGROUND = 60.0


# -- measuring frames ---------------------------------------------------------------------------------


def features(frames: np.ndarray) -> dict[str, np.ndarray]:
    """Per frame of uint8 [F, H, W, 3]: background [F, 3] (median colour), object mask [F, H, W], object
    colour [F, 3] and centroid [F, 2] (x, y), NaN where a frame shows no object."""
    pixels = frames.astype(np.float32)
    background = np.median(pixels.reshape(len(frames), -1, 3), axis=1)  # [F, 3]
    mask = np.linalg.norm(pixels - background[:, None, None], axis=-1) > FOREGROUND  # [F, H, W]
    area = mask.sum(axis=(1, 2)).astype(np.float32)  # [F]
    with np.errstate(invalid="ignore", divide="ignore"):
        colour = (pixels * mask[..., None]).sum(axis=(1, 2)) / area[:, None]
        ys, xs = np.mgrid[0:frames.shape[1], 0:frames.shape[2]] + 0.5
        centroid = np.stack([(mask * xs).sum(axis=(1, 2)), (mask * ys).sum(axis=(1, 2))], axis=1) / area[:, None]
    return {"background": background, "mask": mask, "colour": colour, "centroid": centroid}


def centred(mask: np.ndarray, centroid: np.ndarray) -> np.ndarray:
    """An object mask [H, W] moved so that its centroid sits at the frame's centre: its shape alone."""
    h, w = mask.shape
    if np.isnan(centroid).any():
        return mask
    return np.roll(mask, (round(h / 2 - centroid[1]), round(w / 2 - centroid[0])), axis=(0, 1))


def distance(a: dict, b: dict, measure: str) -> np.ndarray:
    """Per-frame distance [F] between two measured videos: RGB for colours, pixels for places, 1 - IoU of
    the centred masks for shapes; NaN where either frame shows no object."""
    if measure == "background":
        return np.linalg.norm(a["background"] - b["background"], axis=1)
    if measure == "object colour":
        return np.linalg.norm(a["colour"] - b["colour"], axis=1)
    if measure == "object place":
        return np.linalg.norm(a["centroid"] - b["centroid"], axis=1)
    out = np.full(len(a["mask"]), np.nan)
    for f in range(len(out)):
        if not (np.isnan(a["centroid"][f]).any() or np.isnan(b["centroid"][f]).any()):
            ma, mb = centred(a["mask"][f], a["centroid"][f]), centred(b["mask"][f], b["centroid"][f])
            out[f] = 1 - (ma & mb).sum() / (ma | mb).sum()
    return out


# -- switches -----------------------------------------------------------------------------------------


def decoded(model, codec, cfg: Config, cond: Conditioning, samples: list[int], seed: int, blocks: int) -> np.ndarray:
    """The videos of `cond` (one row a sample) as uint8 [B, F, H, W, 3]."""
    with torch.no_grad():
        latents = sample_video(model, cond, cfg, block_noise(cfg, seed, samples), blocks)
        return np.stack([to_uint8(v) for v in codec.decode(latents)])


def switches(model, encoder, codec, base: Config, args: argparse.Namespace) -> tuple[list[dict], list[np.ndarray]]:
    """Per order, mode and measure: share new and old remaining per block from the last one before the
    switch on; and the contact sheet's rows."""
    k, b = base.video.frames_per_block, args.switch_block
    names = list(PAIRS)
    samples = [s for _ in names for s in range(args.samples)]  # rows: pair-major, then noise sample
    old = encoder([PAIRS[n][0] for n in names for _ in range(args.samples)])  # [R, L, D]
    new = encoder([PAIRS[n][1] for n in names for _ in range(args.samples)])
    results, sheet = [], []
    for order in ORDERS:
        cfg = with_overrides(base, [f"sampling.method={order}", f"video.num_latent_frames={args.blocks * k}"])
        # the unswitched videos of both prompts, in one batch, and their measures
        both = decoded(model, codec, cfg, Conditioning([Segment(0, torch.cat([old, new]))]), samples * 2,
                       args.seed, args.blocks)
        refs = both[:len(samples)], both[len(samples):]
        old_f, new_f = ([features(v) for v in r] for r in refs)
        videos = {}
        for mode in MODES:
            videos[mode] = decoded(model, codec, with_overrides(cfg, [f"sampling.switch={mode}"]),
                                   Conditioning([Segment(0, old), Segment(b, new)]), samples, args.seed, args.blocks)
            switched_f = [features(v) for v in videos[mode]]
            for measure in MEASURES:
                by_pair = {}  # pair -> (d_new, d_old, reference gap), each [samples, F]
                for i, name in enumerate(names):
                    if measure == "object place" or measure in PAIRS[name][2]:
                        rows = range(i * args.samples, (i + 1) * args.samples)
                        by_pair[name] = [np.array([distance(x[r], y[r], measure) for r in rows])
                                         for x, y in ((switched_f, new_f), (switched_f, old_f), (old_f, new_f))]
                pooled = [np.concatenate(d) for d in zip(*by_pair.values())]
                results.append({"order": order, "mode": mode, "measure": measure,
                                **per_block(*pooled, k, b, args.blocks),
                                "pairs": {name: per_block(*d, k, b, args.blocks) for name, d in by_pair.items()}})
        for row in range(0, len(samples), args.samples):  # the first noise sample of every pair
            sheet += [strip(v[row], k, b) for v in (refs[0], *videos.values(), refs[1])]
    return results, sheet


def per_block(d_new: np.ndarray, d_old: np.ndarray, gap: np.ndarray, k: int, switch_block: int,
              blocks: int) -> dict[str, list[float]]:
    """Share new, old remaining and the references' own distance, per block from switch_block - 1 on
    (the first entry, before the switch, checks the measure: a share of 0 and a remainder of 1)."""
    out: dict[str, list[float]] = {"share new": [], "old remaining": [], "reference gap": [], "frames": []}
    with np.errstate(invalid="ignore", divide="ignore"):
        for n in range(switch_block - 1, blocks):
            dn, do, g = (d[:, n * k:(n + 1) * k].ravel() for d in (d_new, d_old, gap))
            seen = ~(np.isnan(dn) | np.isnan(do))
            out["share new"].append(float((dn[seen] < do[seen]).mean()) if seen.any() else float("nan"))
            out["old remaining"].append(float(np.nanmean(dn[seen] / (dn[seen] + do[seen]))) if seen.any()
                                        else float("nan"))
            out["reference gap"].append(float(np.nanmean(g)) if not np.isnan(g).all() else float("nan"))
            out["frames"].append(int(seen.sum()))
    return out


def strip(video: np.ndarray, k: int, switch_block: int) -> np.ndarray:
    """One frame a block (its middle one) side by side, with a white bar before the switch block."""
    tiles = [video[n * k + k // 2] for n in range(len(video) // k)]
    bar = np.full((video.shape[1], 2, 3), 255, np.uint8)
    return np.concatenate([*tiles[:switch_block], bar, *tiles[switch_block:]], axis=1)


# -- continuation -------------------------------------------------------------------------------------


def continuation(model, encoder, codec, base: Config, args: argparse.Namespace) -> list[dict]:
    """Per order and what is continued: the object's jump at the boundary against the world's and the
    student's motion per frame, mean over `--clips` one-object clips of the toy world. Continued are the
    clip's first frame (image), its frames (video), and, as the baseline of a prefix the student could
    have drawn itself, its own video of the clip's caption (own video, no world truth)."""
    k = base.video.frames_per_block
    clips = [c for c in (sample_clip(args.seed, i) for i in range(1000)) if len(c.objects) == 1][:args.clips]
    given = base.video.window_frames or 6 * k  # a whole window's worth of frames, more than the prefix keeps
    rendered = torch.from_numpy(np.stack([clip_to_video(c.render(given)) for c in clips]))  # [B, F, 3, H, W]
    states = encoder([c.caption for c in clips])
    samples = list(range(len(clips)))
    results = []
    for order in ORDERS:
        cfg = with_overrides(base, [f"sampling.method={order}", f"video.num_latent_frames={args.continue_blocks * k}"])
        for kind in ("image", "video", "own video"):
            if kind == "own video":  # other noise than the continuation's
                own = with_overrides(cfg, [f"video.num_latent_frames={given}"])
                with torch.no_grad():
                    latents = sample_video(model, states, own, block_noise(own, args.seed + 1, samples), given // k)
            else:
                latents = codec.encode(rendered[:, :1] if kind == "image" else rendered)  # [B, F', C, h, w]
            prefix = latents if kind == "image" else context_latents(latents, cfg.video.window_frames, k)
            first = given - prefix.shape[1] if kind == "video" else 0  # the world frame of the prefix's first
            cond = Conditioning([Segment(0, states)], prefix=prefix)
            stream = Stream.start(model, codec, cfg, cond, block_noise(cfg, args.seed, samples),
                                  args.continue_blocks, prefix_out=True)
            frames = torch.cat([block.frames for block in stream], dim=1)  # [B, P + N k, 3, H, W]
            rows = [boundary(to_uint8(v), None if kind == "own video" else clip, prefix.shape[1], first)
                    for v, clip in zip(frames, clips)]
            results.append({"order": order, "kind": kind, "prefix_frames": prefix.shape[1], "clips": rows,
                            **{key: mean([r[key] for r in rows]) for key in rows[0]}})
    return results


def mean(values) -> float:
    """The mean of the values that are not NaN (an object the student did not draw), or NaN."""
    seen = [v for v in values if not np.isnan(v)]
    return float(np.mean(seen)) if seen else float("nan")


def boundary(video: np.ndarray, clip: ToyClip | None, p: int, first: int) -> dict[str, float]:
    """The jumps of one continued video (uint8 [P + G, H, W, 3], P given frames, the first of them world
    frame `first` of `clip`) from frame P - 1 to P, and what they compare with (NaN: no world truth)."""
    f = features(video)
    truth = np.full((len(video), 2), np.nan)  # [F, 2] the world's centroids
    if clip is not None:
        obj = clip.objects[0]
        truth[:] = [obj.centroid(first + i, clip.height, clip.width) for i in range(len(video))]

    def step(x: np.ndarray) -> np.ndarray:  # change from each frame to the next, [F - 1]
        return np.linalg.norm(np.diff(x, axis=0), axis=1)

    place, colour, background = step(f["centroid"]), step(f["colour"]), step(f["background"])
    return {"place jump": float(place[p - 1]), "world motion": float(step(truth)[p - 1]),
            "student motion": mean(place[p:]),
            "first frame vs world": float(np.linalg.norm(f["centroid"][p] - truth[p])),
            "given frame vs world": float(np.linalg.norm(f["centroid"][p - 1] - truth[p - 1])),
            "colour jump": float(colour[p - 1]), "student colour change": mean(colour[p:]),
            "background jump": float(background[p - 1]), "student background change": mean(background[p:])}


# -- the report ---------------------------------------------------------------------------------------


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows)]


SETTLED = 0.9  # share of frames nearer the new prompt's video from which a switch counts as done


def first(shares: list[float]) -> str:
    """The first index whose share is at least SETTLED, or 'never'."""
    return next((str(i) for i, v in enumerate(shares) if v >= SETTLED), "never")


def settled(shares: list[float]) -> str:
    """The first index from which every share is at least SETTLED, or 'never'."""
    for i in range(len(shares)):
        if all(v >= SETTLED for v in shares[i:]):
            return str(i)
    return "never"


def report(switched: list[dict], continued: list[dict], args: argparse.Namespace, seconds: float, cpu: float) -> str:
    blocks = ["before", *(str(i) for i in range(args.blocks - args.switch_block))]
    lines = [f"Toy default (configs/toy/hiar.yaml, its embedded student); `python -m eval.steering "
             f"--output_folder docs/steering --overwrite` took {seconds:.0f} s ({cpu:.0f} s of CPU time) on "
             f"{os.cpu_count()} CPU cores ({time.strftime('%Y-%m-%d')}).", "",
             "## Prompt switches", "",
             f"A switch at block {args.switch_block} of {args.blocks}; {len(PAIRS)} prompt pairs "
             f"({', '.join(PAIRS)}) x {args.samples} noise samples (seed {args.seed}). A measure counts only "
             "the pairs whose prompts differ in it (object place: every pair)."]
    rows = [[r["order"], r["mode"], r["measure"], first(r["share new"][1:]), settled(r["share new"][1:]),
             f"{r['old remaining'][1]:.2f}", f"{r['old remaining'][-1]:.2f}"] for r in switched]
    lines += ["", f"**Summary**: blocks after the switch (0: the first of the new prompt) until at least "
              f"{SETTLED:.0%} of frames are nearer the new prompt's video: the first such block, and the block from "
              f"which it holds to the end ('never': not within {args.blocks - args.switch_block} blocks); how much "
              "of the old remains (old remaining, below) in the first and the last block.", "",
              *table(["order", "mode", "measure", "first new", "new from", "old remaining, block 0",
                      "old remaining, last"], rows), "",
              "Per block: columns are the last block before the switch (a check: 0 and 1), then the blocks after "
              "it. contact_sheet.png shows noise sample 0, one frame a block (its middle one), a white bar before "
              "the switch; for each order (frame_first, then timestep_first) and pair (in the order above), four "
              "rows: the old prompt's video, the switch with new_blocks, with recache, the new prompt's video."]
    for key, what in (("share new", "share of frames nearer the new prompt's unswitched video than the old one's"),
                      ("old remaining", "mean d_new / (d_new + d_old): 0 is the new prompt's video, 1 the old one's")):
        rows = [[r["order"], r["mode"], r["measure"], *(f"{v:.2f}" for v in r[key])] for r in switched]
        lines += ["", f"**{key}**: {what}.", "", *table(["order", "mode", "measure", *blocks], rows)]
    gaps = {r["measure"]: np.nanmean(r["reference gap"][1:]) for r in switched if r["mode"] == MODES[0]}
    lines += ["", "Distance between the two references after the switch (what the measures separate): " +
              ", ".join(f"{m} {g:.1f}" for m, g in gaps.items()) +
              " (RGB for colours, pixels for place, 1 - IoU for shape)."]
    lines += ["", "## Continuation", "",
              f"{args.clips} one-object toy clips continued for {args.continue_blocks} blocks from their first "
              "frame (image), from their last W - k latent frames (video), or, as a baseline, from the last W - k "
              "latent frames of the student's own video of the clip's caption (own video); the caption is the prompt. "
              "Jumps are from the last given frame (through the codec) to the first generated one; motion and "
              "change are per frame (the student's: the mean over the generated frames); pixels, RGB distance."]
    keys = ["place jump", "world motion", "student motion", "first frame vs world", "given frame vs world",
            "colour jump", "student colour change", "background jump", "student background change"]
    rows = [[r["kind"], r["order"], str(r["prefix_frames"]), *(f"{r[key]:.1f}".replace("nan", "-") for key in keys)]
            for r in continued]
    lines += ["", *table(["continues", "order", "prefix frames", *keys], rows)]
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> None:
    folder = Path(args.output_folder)
    refuse_existing([folder / name for name in FILES], args.overwrite)
    start, start_cpu = time.perf_counter(), time.process_time()
    torch.manual_seed(0)
    base = load_config(repo_path("configs/toy/hiar.yaml"))
    model = load_generator(repo_path(base.runtime.checkpoint), base)[0].eval()
    encoder, codec = build_text_encoder(base), build_codec(base)
    switched, sheet = switches(model, encoder, codec, base, args)
    continued = continuation(model, encoder, codec, base, args)
    text = report(switched, continued, args, time.perf_counter() - start, time.process_time() - start_cpu)
    from PIL import Image

    with new_file(folder / "contact_sheet.png", args.overwrite) as tmp:
        # 256 adaptive colours: the sheet is for the eye (the numbers are in steering.json), at half the bytes
        Image.fromarray(np.concatenate(sheet, axis=0)).quantize(256).save(tmp, format="PNG", optimize=True)
    with new_file(folder / "steering.json", args.overwrite) as tmp:
        tmp.write_text(json.dumps({"settings": vars(args), "pairs": PAIRS, "switches": switched,
                                   "continuation": continued}, indent=1, default=float))
    with new_file(folder / "steering.md", args.overwrite) as tmp:
        tmp.write_text(text)
    print(text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output_folder", default="runs/steering")
    p.add_argument("--blocks", type=int, default=14, help="blocks of each switched video")
    p.add_argument("--switch_block", type=int, default=4)
    p.add_argument("--samples", type=int, default=3, help="noise samples of each prompt pair")
    p.add_argument("--clips", type=int, default=6, help="toy clips continued")
    p.add_argument("--continue_blocks", type=int, default=4, help="blocks generated after each clip")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    args = p.parse_args(argv)
    if not 0 < args.switch_block < args.blocks:
        print(f"error: --switch_block must lie in 1..{args.blocks - 1}", file=sys.stderr)
        return 2
    return exit_code(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
