"""Generate videos from text with a HiAR (or Self-Forcing) student.

    python inference.py --config_path configs/toy/hiar.yaml --prompt "a red circle moving left" \
        --num_output_frames 21 --inference_method timestep_first

Every input is checked before any compute. Under torchrun, prompts are sharded across ranks.
Trailing `section.key=value` arguments override the config (e.g. video.window_frames=12).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm import tqdm

from hiar.checkpoints import CheckpointError, load_generator
from hiar.codecs import Codec, build_codec
from hiar.config import Config, ConfigError, load_config, save_config, whole_blocks
from hiar.models import WanModel
from hiar.parallel import PipelineError, StageGroup, local_rank_device, pipeline_stage, stage_steps
from hiar.pipeline import render, writable_folder
from hiar.sampling import CellRunner, block_noise, generate
from hiar.text import build_text_encoder

ROOT = Path(__file__).resolve().parent
DEFAULT_CONFIG = "configs/toy/hiar.yaml"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config_path", default=DEFAULT_CONFIG, help="YAML config or preset name")
    p.add_argument("--checkpoint_path", help="model weights (default: the config's runtime.checkpoint; none: random)")
    p.add_argument("--data_path", help="text file, one prompt a line (default: the config's runtime.prompts)")
    p.add_argument("--prompt", help="a single prompt (instead of --data_path)")
    p.add_argument("--output_folder", default="outputs", help="where videos go (created if needed)")
    p.add_argument("--num_output_frames", type=int, help="latent frames per video (default: the config's)")
    p.add_argument("--use_ema", action="store_true", help="use the EMA weights of a training checkpoint")
    p.add_argument("--inference_method", choices=["frame_first", "timestep_first", "hybrid_block0"],
                   help="order of the (block, step) cells (default: the config's)")
    p.add_argument("--num_frame_first_blocks", type=int, help="hybrid_block0: blocks denoised frame-first")
    p.add_argument("--schedule", choices=["step_major", "wavefront"], help="execution of step-first cells")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num_samples", type=int, default=1, help="videos per prompt")
    p.add_argument("--save_with_index", action="store_true", help="name files by prompt index, not prompt text")
    p.add_argument("--save_latents", action="store_true", help="save final latents beside each mp4")
    p.add_argument("--overwrite", action="store_true", help="replace existing files instead of picking new names")
    p.add_argument("--parallel", choices=["data", "pipeline"], default="data",
                   help="under torchrun: shard prompts across ranks (data) or run the steps as a pipeline, "
                        "one stage per rank (pipeline)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    return p.parse_intermixed_args(argv)  # options may follow the section.key=value overrides


def resolve_config(args: argparse.Namespace) -> Config:
    overrides = list(args.overrides)
    for flag, key in (("inference_method", "method"), ("schedule", "schedule"),
                      ("num_frame_first_blocks", "num_frame_first_blocks")):
        if getattr(args, flag) is not None:
            overrides.append(f"sampling.{key}={getattr(args, flag)}")
    return load_config(args.config_path, overrides)


def read_prompts(args: argparse.Namespace, cfg: Config) -> list[str]:
    """--prompt, or the lines of --data_path (default: the config's runtime.prompts file)."""
    if args.prompt is not None and args.data_path is not None:
        raise ValueError("give one of --prompt or --data_path, not both")
    if args.prompt is None and args.data_path is None:
        args.data_path = str(ROOT / cfg.runtime.prompts)
    if args.prompt is not None:
        prompts = [args.prompt.strip()]
    else:
        path = Path(args.data_path)
        if not path.is_file():
            raise ValueError(f"prompt file {path} does not exist")
        prompts = [line.strip() for line in path.read_text().splitlines()]
    prompts = [p for p in prompts if p]
    if not prompts:
        raise ValueError(f"no prompts: {'--prompt is empty' if args.prompt is not None else f'{args.data_path} is empty'}")
    return prompts


def output_stem(prompt: str, index: int, sample: int, by_index: bool) -> str:
    if by_index:
        return f"{index}-{sample}"
    return f"{re.sub(r'[^A-Za-z0-9 ,._-]+', '_', prompt)[:100].strip()}-{sample}"


def free_path(folder: Path, stem: str, overwrite: bool, taken: set[Path]) -> Path:
    """folder/stem.mp4, or the first 'stem (2).mp4', 'stem (3).mp4', ... that does not exist yet."""
    path, i = folder / f"{stem}.mp4", 1
    while (not overwrite and path.exists()) or path in taken:
        i += 1
        path = folder / f"{stem} ({i}).mp4"
    taken.add(path)
    return path


def build_generator(args: argparse.Namespace, cfg: Config) -> WanModel:
    path = args.checkpoint_path or (cfg.runtime.checkpoint and str(ROOT / cfg.runtime.checkpoint))
    if path:
        return load_generator(path, cfg, args.use_ema)[0]
    print("\n" + "!" * 78 + "\n!! WARNING: no --checkpoint_path: the model has RANDOM weights. The videos show\n"
          "!! noise, not the prompt. Pass a checkpoint for real results.\n" + "!" * 78 + "\n", file=sys.stderr)
    torch.manual_seed(0)
    return WanModel(cfg.model)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", 1))
    pipelined = args.parallel == "pipeline"
    # 1. Check every input before any compute (and before any model is loaded).
    try:
        cfg = resolve_config(args)
        num_frames = args.num_output_frames or cfg.video.num_latent_frames
        num_blocks = whole_blocks("--num_output_frames", num_frames, cfg.video.frames_per_block)
        prompts = read_prompts(args, cfg)
        if args.num_samples < 1:
            raise ValueError(f"--num_samples={args.num_samples} must be at least 1")
        if pipelined:
            if cfg.sampling.method != "timestep_first":
                raise ValueError("--parallel pipeline runs the step-first order: use --inference_method timestep_first")
            stage_steps(len(cfg.schedule.denoising_steps), world)
        folder = writable_folder(args.output_folder)
        device = local_rank_device(args.device) if world > 1 else torch.device(args.device)
        codec = build_codec(cfg, device)
        group = StageGroup(len(cfg.schedule.denoising_steps)) if pipelined else None
        text_encoder = build_text_encoder(cfg, device)
        model = build_generator(args, cfg)
    except (ConfigError, ValueError, OSError, NotImplementedError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    cfg.video.num_latent_frames = num_frames
    dtype = cfg.torch_dtype(device)
    model = model.to(device, dtype).eval()
    rank = group.rank if group else int(os.environ.get("RANK", 0))
    if rank == 0:
        save_config(cfg, folder / "config.yaml")

    # 2. Which prompts this process works on and, if it writes, the files they go to.
    mine = list(enumerate(prompts)) if pipelined else [(i, p) for i, p in enumerate(prompts) if i % world == rank]
    writes = group is None or group.is_last
    taken: set[Path] = set()
    jobs = [(i, p, [free_path(folder, output_stem(p, i, s, args.save_with_index), args.overwrite, taken)
                    for s in range(args.num_samples)] if writes else []) for i, p in mine]

    # 3. Generate, streaming each finished block to its file.
    steps = len(group.steps) if group else len(cfg.schedule.denoising_steps)
    bar = tqdm(total=len(jobs) * num_blocks * steps, unit="cell", desc=f"{cfg.sampling.method} (rank {rank})",
               disable=rank != 0)
    try:
        frames, seconds, first_block = Generation(cfg, model, text_encoder, codec, group, device, dtype).run(
            jobs, num_blocks, args, bar)
    except PipelineError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    bar.close()

    # 4. Report: every data-parallel rank for itself; for a pipeline, rank 0 for the last stage.
    if group:
        report = group.send_to_first([frames, seconds, first_block or 0.0])
        group.close()
        if report is None:
            return 0
        frames, seconds, first_block = report
    print(f"rank {rank}: {frames:.0f} frames in {seconds:.1f} s: {frames / max(seconds, 1e-9):.2f} frames/s, "
          f"first block after {first_block or 0:.2f} s ({cfg.sampling.method}, {cfg.sampling.schedule}"
          f"{f', {world}-stage pipeline' if group else ''}, {device})")
    return 0


@dataclasses.dataclass
class Generation:
    """What every job of this process shares: the model, its text encoder and codec, the pipeline group."""
    cfg: Config
    model: WanModel
    text_encoder: Callable[[list[str]], torch.Tensor]
    codec: Codec
    group: StageGroup | None
    device: torch.device
    dtype: torch.dtype

    @torch.no_grad()  # every stage, not only the one that renders (autograd would also keep unfused passes)
    def run(self, jobs: list[tuple[int, str, list[Path]]], num_blocks: int, args: argparse.Namespace,
            bar: tqdm) -> tuple[int, float, float | None]:
        """Run every (prompt index, prompt, output paths) job; returns (frames written, seconds, first-block latency)."""
        cfg, group = self.cfg, self.group
        frames, seconds, first_block = 0, 0.0, None
        writes = group is None or group.is_last
        if group:
            group.barrier()
        for index, prompt, paths in jobs:
            text = self.text_encoder([prompt]).to(self.device, self.dtype).expand(args.num_samples, -1, -1)
            noise = block_noise(cfg, args.seed, range(args.num_samples), self.device)
            if group:
                blocks = pipeline_stage(CellRunner(self.model, text, cfg, noise, on_cell=bar.update), group, num_blocks)
            else:
                blocks = generate(self.model, text, cfg, noise, num_blocks, on_cell=bar.update)
            if not writes:
                for _ in blocks:  # this stage's cells; the last stage writes
                    pass
                continue
            latents = [p.with_suffix(".latents.safetensors") for p in paths] if args.save_latents else None
            out = render(self.codec, cfg, blocks, paths, latents, {"prompt": prompt, "prompt_index": str(index)})
            frames, seconds = frames + out.video_frames * len(paths), seconds + out.seconds
            first_block = first_block if first_block is not None else out.first_block_seconds
            for path in paths:
                print(f"wrote {path}")
        return frames, seconds, first_block


if __name__ == "__main__":
    sys.exit(main())
