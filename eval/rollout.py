"""Long rollouts: the same prompts and seeds through several methods or checkpoints, then drift scores.

    python -m eval.rollout --out runs/eval/long --data_path data/toy_prompts.txt --seconds 60 \
        --method hiar=runs/toy/student.safetensors --method self_forcing=runs/toy/sf.safetensors:sampling.method=frame_first

Each --method is name=checkpoint[:section.key=value[:...]]; an empty checkpoint means random weights
(smoke tests only: the video is noise). Every method reads --config_path, then its overrides; step-first
methods run the wavefront schedule, which streams blocks out with one window of KV cache a step, so
memory stays flat for any length (a config whose video.window_frames is 0 attends to the whole video
and is refused). Videos go to <out>/videos/<method>/<prompt index>-<sample>.mp4 with prompts.json and
config.yaml, then <out>/scores.json is written as eval.drift writes it. Noise is a pure function of
(seed, sample, block, step), so every method starts from the same noise.

Outputs: a file this run would write that exists already stops it before any model is loaded, unless
--overwrite (which replaces only this run's files). Each file is written in a private hidden folder
and then claimed under its name in one step that fails rather than replace a file (config.yaml first,
before generating: it claims the method's folder), so two runs into one --out never clobber each other.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm import tqdm

from hiar.checkpoints import CheckpointError, load_generator
from hiar.codecs import build_codec, rendered_frames
from hiar.config import PRESET_DIR, Config, ConfigError, load_config, repo_path, save_config, with_overrides
from hiar.models import WanModel
from hiar.outputs import OVERWRITE_HELP, new_file, publish, refuse_existing
from hiar.render import render
from hiar.sampling import block_noise, generate
from hiar.scoring import write_scores
from hiar.text import build_text_encoder
from hiar.videoset import PROMPTS_FILE


@dataclass
class Method:
    name: str
    checkpoint: str | None
    overrides: list[str]
    cfg: Config | None = None


def parse_method(text: str) -> Method:
    name, sep, rest = text.partition("=")
    parts = rest.split(":")
    # the name is a folder under <out>/videos: '..' or '.' would put the videos in --out or videos/ itself
    plain = name and not name.startswith(".") and not any(c in name for c in "/\\\0")
    if not sep or not plain or any("=" not in o for o in parts[1:]):
        raise ValueError(f"--method {text!r}: expected name=checkpoint[:section.key=value[:...]], the name a plain "
                         "folder name (no '/' or '\\', not starting with '.')")
    return Method(name, parts[0] or None, parts[1:])


def latent_frames(cfg: Config, seconds: float) -> int:
    """Latent frames, rounded up to whole blocks, for at least `seconds` of video. A codec with
    temporal stride s decodes F latent frames to 1 + s (F - 1) frames (Wan: 4; the toy codec: 1)."""
    s, k = cfg.video.vae_stride[0], cfg.video.frames_per_block
    frames = max(1, math.ceil((seconds * cfg.video.fps - 1) / s) + 1)
    return math.ceil(frames / k) * k


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="run folder: videos/, scores.json")
    p.add_argument("--method", action="append", required=True, metavar="NAME=CKPT[:OVERRIDES]")
    p.add_argument("--config_path", default=str(PRESET_DIR / "toy" / "hiar.yaml"),
                   help="YAML config or preset name (default: the repository's configs/toy/hiar.yaml)")
    p.add_argument("--data_path", help="one prompt a line (default: the config's runtime.prompts, from the "
                   "repository root)")
    p.add_argument("--seconds", type=float, default=20.0, help="video length (rounded up to whole blocks)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num_samples", type=int, default=1, help="videos per prompt")
    p.add_argument("--use_ema", action="store_true")
    p.add_argument("--save_latents", action="store_true")
    p.add_argument("--segments", type=int, default=5)
    p.add_argument("--weights", help="local folder of the weighted metrics (see eval.drift)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    return p.parse_args(argv)


def method_config(m: Method, args: argparse.Namespace) -> Config:
    """--config_path with the method's overrides, streamed (wavefront, a window) for --seconds of video."""
    if m.checkpoint and not Path(m.checkpoint).exists():
        raise ValueError(f"--method {m.name}: checkpoint {m.checkpoint} does not exist")
    cfg = load_config(args.config_path, ["sampling.schedule=wavefront", *m.overrides])
    if cfg.video.window_frames == 0:
        raise ValueError(f"--method {m.name}: video.window_frames=0 attends to the whole video, so memory grows "
                         "with its length: set video.window_frames (configs/toy/hiar.yaml uses 21)")
    return with_overrides(cfg, [f"video.num_latent_frames={latent_frames(cfg, args.seconds)}"])


def check(args: argparse.Namespace) -> tuple[list[Method], list[str]]:
    """Every input, before any model is loaded."""
    methods = [parse_method(m) for m in args.method]
    if len({m.name for m in methods}) != len(methods):
        raise ValueError("--method names must differ")
    methods = [replace(m, cfg=method_config(m, args)) for m in methods]
    prompts_path = Path(args.data_path) if args.data_path else repo_path(methods[0].cfg.runtime.prompts)
    if not prompts_path.is_file():
        raise ValueError(f"prompt file {prompts_path} does not exist")
    prompts = [line.strip() for line in prompts_path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"no prompts in {prompts_path}")
    if args.seconds <= 0 or args.num_samples < 1:
        raise ValueError("--seconds must be positive and --num_samples at least 1")
    check_scoring(methods, args)
    return methods, prompts


def check_scoring(methods: list[Method], args: argparse.Namespace) -> None:
    """What eval.drift would refuse after the generation, refused before it."""
    frames = min(rendered_frames(m.cfg) for m in methods)
    if not 2 <= args.segments <= frames:
        raise ValueError(f"--segments={args.segments}: give 2 to {frames} (the frames of a video this long)")
    if args.weights and not Path(args.weights).is_dir():
        raise ValueError(f"--weights {args.weights} is not a folder: give the folder of the metric weights or omit it")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise ValueError(f"--device {args.device!r} is not a device: use cpu or cuda[:N]") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: no CUDA device is visible here; use --device cpu")


def outputs(m: Method, prompts: list[str], args: argparse.Namespace, folder: Path) -> list[Path]:
    """Every file the run writes for method `m` into its folder."""
    videos = [folder / f"{i:03d}-{s}.mp4" for i in range(len(prompts)) for s in range(args.num_samples)]
    latents = [v.with_suffix(".latents.safetensors") for v in videos] if args.save_latents else []
    return [folder / "config.yaml", folder / PROMPTS_FILE, *videos, *latents]


def check_outputs(methods: list[Method], prompts: list[str], args: argparse.Namespace, out: Path) -> None:
    """Refuse, before any model is loaded, to replace a file without --overwrite, or to leave a video in
    a method's folder that this run does not write (it would be scored as that method)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file: give a folder for videos/ and scores.json")
    planned = {m.name: outputs(m, prompts, args, out / "videos" / m.name) for m in methods}
    refuse_existing([out / "scores.json", *(p for paths in planned.values() for p in paths)], args.overwrite)
    for name, paths in planned.items():
        stray = sorted(set((out / "videos" / name).glob("*.mp4")) - set(paths))
        if stray:
            raise ValueError(f"{stray[0]} is not one of this run's videos but would be scored as method {name}: move "
                             "it away, or choose another --out")


def claim_folders(methods: list[Method], args: argparse.Namespace, out: Path) -> dict[str, Path]:
    """Write each method's config.yaml under an exclusive claim: a second run with the same method into
    this --out stops here, before generating anything."""
    folders = {}
    for m in methods:
        folders[m.name] = out / "videos" / m.name
        with new_file(folders[m.name] / "config.yaml", args.overwrite) as tmp:
            save_config(m.cfg, tmp)
    return folders


def run_method(m: Method, prompts: list[str], args: argparse.Namespace, folder: Path) -> None:
    cfg, device = m.cfg, torch.device(args.device)
    if m.checkpoint:
        model = load_generator(m.checkpoint, cfg, args.use_ema)[0]
    else:
        print(f"WARNING: --method {m.name} has no checkpoint: RANDOM weights, the videos are noise", file=sys.stderr)
        torch.manual_seed(0)
        model = WanModel(cfg.model)
    model = model.to(device, cfg.torch_dtype(device)).eval()
    codec, encoder = build_codec(cfg, device), build_text_encoder(cfg, device)
    num_blocks = cfg.geometry.num_blocks
    bar = tqdm(total=len(prompts) * num_blocks * len(cfg.schedule.denoising_steps), unit="cell", desc=m.name)
    listed = {}
    # Files are written whole in a private hidden folder (not scanned for *.mp4), then published.
    private = Path(tempfile.mkdtemp(dir=folder, prefix=".rollout-"))
    try:
        for i, prompt in enumerate(prompts):
            paths = [private / f"{i:03d}-{s}.mp4" for s in range(args.num_samples)]
            text = encoder([prompt]).to(device, cfg.torch_dtype(device)).expand(args.num_samples, -1, -1)
            blocks = generate(model, text, cfg, block_noise(cfg, args.seed, range(args.num_samples), device),
                              num_blocks, on_cell=bar.update)
            latents = [p.with_suffix(".latents.safetensors") for p in paths] if args.save_latents else []
            render(codec, cfg, blocks, paths, latents or None,
                   {"prompt": prompt, "prompt_index": str(i), "method": m.name})
            for path in [*paths, *latents]:
                publish(path, folder / path.name, args.overwrite)
            listed |= {p.name: prompt for p in paths}
            with new_file(folder / PROMPTS_FILE, args.overwrite or i > 0) as tmp:  # after the first: our own file
                tmp.write_text(json.dumps(listed, indent=1))
    finally:
        bar.close()  # now, not at garbage collection, where it would print after the error
        shutil.rmtree(private, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        methods, prompts = check(args)
        out = Path(args.out)
        check_outputs(methods, prompts, args, out)
        folders = claim_folders(methods, args, out)
        for m in methods:
            run_method(m, prompts, args, folders[m.name])
        write_scores(str(out / "videos"), str(out / "scores.json"), args.segments, 20, args.weights, args.device,
                     args.overwrite)
    except (ConfigError, ValueError, OSError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
