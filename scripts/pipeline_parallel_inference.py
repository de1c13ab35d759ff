"""Pipelined parallel inference with the HiAR README's command line: a thin front over inference.py.

    torchrun --nproc_per_node=4 scripts/pipeline_parallel_inference.py --config_path configs/hiar.yaml \\
        --checkpoint_path ckpts/hiar.pt --prompt "A cat sitting on a windowsill watching the rain fall outside" \\
        --output_path outputs/pipeline_output.mp4 --num_output_frames 81

Runs `inference.py --parallel pipeline --inference_method timestep_first` (hiar/parallel.py: one process
per contiguous group of denoising steps, any number of processes from 1 to the number of steps; the
video is bit-identical to the sequential run). Started without torchrun it runs the same step-first
generation in this one process. Flags, as the published script's:

  --prompt, --data_path  one prompt, or a file of them (--prompt wins when both are given); neither: the
                     config's runtime.prompts.
  --output_path      the video, at exactly this path (.mp4; replaced when it exists, as the published script
                     does); with several prompts (--data_path), <stem>_<i>.mp4 for prompt i. The videos are
                     made in the private folder .<name>.parts beside it and moved there when complete.
  --seed, --noise_seed  every noise of a generation (each block's starting noise and each step's SDE
                     re-noise) is a pure function of (one seed, block, step) here, so one seed covers both
                     of the published script's: the cell-noise seed is --noise_seed when given, else --seed.
                     `--seed S` makes the same video as `inference.py --seed S`.
  --no_dac           accepted, no effect: the project's pipeline always overlaps as DAC does (each stage sends
                     a block's latent with a non-blocking send before running that block's deferred cache
                     writes); there is no barrier+broadcast baseline to fall back to.
  --profile, --profile_output PREFIX
                     per-rank timings as JSON (PREFIX_dac_rank<r>.json, or _baseline_ with --no_dac, as the
                     published script names them) and a summary line per rank. The project has no timing
                     hooks inside a cell, so there is no D (denoise) / A (add noise) / C (cache write) split:
                     what is measured is each rank's load time, generation wall time, the time each of its
                     cells finished, and on the last stage the video frames and first-block latency.
  --use_ema          the published script always takes `generator_ema` when a training checkpoint has it;
                     here .pt / .pth checkpoints get inference.py's --use_ema for that (it warns and falls back
                     to `generator` when absent), and --use_ema forces it for other formats.
Any other inference.py option (e.g. --device, --schedule) or section.key=value override is passed through.
Errors found before compute exit 2 with one line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
import inference
from hiar.render import writable_folder

TRAINING_CHECKPOINT_SUFFIXES = (".pt", ".pth")


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config_path", default=str(ROOT / inference.DEFAULT_CONFIG))
    p.add_argument("--checkpoint_path", help="model weights (default: the config's runtime.checkpoint)")
    p.add_argument("--prompt")
    p.add_argument("--data_path", help="text file with one prompt per line")
    p.add_argument("--output_path", default="outputs/pipeline_output.mp4")
    p.add_argument("--num_output_frames", type=int, default=81, help="latent frames")
    p.add_argument("--seed", type=int, default=42, help="cell-noise seed unless --noise_seed is given")
    p.add_argument("--noise_seed", type=int, help="cell-noise seed (initial and SDE noise; see above)")
    p.add_argument("--use_ema", action="store_true", help="take generator_ema (default for .pt / .pth)")
    p.add_argument("--no_dac", action="store_true", help="accepted; no effect (see above)")
    p.add_argument("--dac_optimize", action="store_true", help=argparse.SUPPRESS)  # the published legacy alias
    p.add_argument("--profile", action="store_true", help="per-rank timings (see above)")
    p.add_argument("--profile_output", help="path prefix of the per-rank JSON profile files")
    return p.parse_known_args(argv)


def check(args: argparse.Namespace) -> tuple[Path, Path]:
    """The output video path and its private parts folder; ValueError / OSError before any compute."""
    out = Path(args.output_path)
    if out.suffix.lower() != ".mp4":
        raise ValueError(f"--output_path {out}: videos are written as .mp4; give a path ending in .mp4")
    if out.is_dir():
        raise ValueError(f"--output_path {out} is a folder: give the video's file path")
    writable_folder(out.parent)
    if args.profile and args.profile_output is not None:
        writable_folder(Path(args.profile_output).parent)
    return out, out.parent / f".{out.name}.parts"


def video_path(out: Path, index: int, num_prompts: int) -> Path:
    """The published script's names: the path itself, or <stem>_<i><suffix> for several prompts."""
    return out if num_prompts == 1 else out.with_name(f"{out.stem}_{index}{out.suffix}")


class Timings:
    """What this rank measures of one run (no hooks inside a cell: see the module docstring)."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.record: dict = {}

    def generation(self):
        timings = self

        class TimedGeneration(inference.Generation):
            def run(self, jobs, num_blocks, folder, args, bar):
                t0 = time.perf_counter()
                done: list[float] = []
                update = bar.update

                def on_cell(n=1):
                    done.append(round(time.perf_counter() - t0, 6))
                    return update(n)

                bar.update = on_cell  # the cell runner's on_cell
                frames, seconds, first_block = super().run(jobs, num_blocks, folder, args, bar)
                steps = self.group.steps if self.group else range(len(self.cfg.schedule.denoising_steps))
                timings.record.update(
                    steps=list(steps), load_s=t0 - timings.start, generate_s=time.perf_counter() - t0,
                    num_blocks=num_blocks, num_prompts=len(jobs), cells=len(done), cell_done_s=done, video_frames=frames,
                    render_s=seconds if frames else None, first_block_s=first_block if frames else None)
                return frames, seconds, first_block

        return TimedGeneration


def main(argv: list[str] | None = None) -> int:
    timings = Timings()
    args, rest = parse_args(argv)
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    pipelined = "WORLD_SIZE" in os.environ  # under torchrun; else the same generation in this process
    try:
        out, parts = check(args)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.no_dac and rank == 0:
        print("note: --no_dac has no effect: this pipeline always sends each block before its cache writes",
              file=sys.stderr)
    forwarded = [
        "--config_path", args.config_path, "--num_output_frames", str(args.num_output_frames),
        "--seed", str(args.seed if args.noise_seed is None else args.noise_seed),
        "--inference_method", "timestep_first", "--output_folder", str(parts), "--save_with_index", "--overwrite",
    ]
    if pipelined:
        forwarded += ["--parallel", "pipeline"]
    if args.prompt is not None:
        args.data_path = None  # as the published script: --prompt wins over --data_path
    for flag in ("checkpoint_path", "prompt", "data_path"):
        if getattr(args, flag) is not None:
            forwarded += [f"--{flag}", getattr(args, flag)]
    if args.use_ema or (args.checkpoint_path or "").lower().endswith(TRAINING_CHECKPOINT_SUFFIXES):
        forwarded.append("--use_ema")
    original = inference.Generation
    if args.profile:
        inference.Generation = timings.generation()
    try:
        rc = inference.main([*forwarded, *rest])
    finally:
        inference.Generation = original
    if rc != 0:
        return rc

    writes = rank == world - 1 if pipelined else True  # the last stage writes the videos
    if writes:
        videos = sorted(parts.glob("*-0.mp4"), key=lambda p: int(p.name.split("-")[0]))
        for index, made in enumerate(videos):
            target = video_path(out, index, len(videos))
            os.replace(made, target)
            print(f"saved {target}")
            latents = made.with_name(f"{index}-0.latents.safetensors")  # with --save_latents
            if latents.exists():
                os.replace(latents, target.with_suffix(".latents.safetensors"))
        for leftover in (parts / "config.yaml", parts / "prompts.json"):  # inference.py's run config and manifest
            leftover.unlink(missing_ok=True)
        try:
            parts.rmdir()
        except OSError:
            pass  # something else is left there: keep it
    if args.profile:
        write_profile(args, timings.record, rank, world, time.perf_counter() - timings.start)
    return 0


def write_profile(args: argparse.Namespace, record: dict, rank: int, world: int, total_s: float) -> None:
    mode = "baseline" if args.no_dac and not args.dac_optimize else "dac"
    steps = record.get("steps") or [0]
    profile = {
        "mode": mode, "note": "one schedule: non-blocking send of each block before its deferred cache writes; "
                              "no per-cell D/A/C split (no timing hooks inside a cell)",
        "rank": rank, "stage": rank, "num_stages": world,
        "num_frames": args.num_output_frames, "total_time_s": total_s, **record,
    }
    if args.profile_output:
        path = Path(f"{args.profile_output}_{mode}_rank{rank}.json")
        path.write_text(json.dumps(profile, indent=2))
    first = profile.get("first_block_s")
    print(f"profile rank {rank} (steps {steps[0]}-{steps[-1]}): load {profile.get('load_s', 0):.2f} s, "
          f"generate {profile.get('generate_s', 0):.2f} s, {profile.get('cells', 0)} cells"
          + (f", {profile['video_frames']} video frames, first block after {first:.2f} s" if first else ""))


if __name__ == "__main__":
    sys.exit(main())
