"""Generate videos from text with a HiAR (or Self-Forcing) student.

    python inference.py --config_path configs/toy/hiar.yaml --prompt "a red circle moving left" \
        --num_output_frames 21 --inference_method timestep_first

Steer a video with prompt switches (--switch 2s "a blue square ..." or --prompt_schedule FILE), or
continue an image (--image) or a video (--video); docs/inference.md. Every input is checked before any compute. Under torchrun, prompts are sharded across ranks.
Trailing `section.key=value` arguments override the config (e.g. video.window_frames=12).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import yaml
from tqdm import tqdm

from hiar.checkpoints import (CheckpointError, adapter_specs, check_checkpoint_path, generator_path, load_adapters,
                              load_generator, read_adapter)
from hiar.codecs import Codec, build_codec
from hiar.conditioning import (Conditioning, Segment, context_latents, parse_switch_time, read_prefix_video,
                               read_schedule)
from hiar.config import (Config, ConfigError, SamplingConfig, choices, config_to_dict, load_config, repo_path,
                         whole_blocks, with_overrides)
from hiar.data import check_prompt, prompt_lines
from hiar.distributed import local_rank_device
from hiar.models import WanModel
from hiar.parallel import PipelineError, StageGroup, pipeline_stage, stage_steps
from hiar.render import render, writable_folder
from hiar.sampling import Blocks, CellRunner, block_noise, check_step_major, run_order
from hiar.stream import Stream
from hiar.text import build_text_encoder
from hiar.video import Claim, claim_free
from hiar.videoset import record_prompts, video_stem

ROOT = Path(__file__).resolve().parent
DEFAULT_CONFIG = "configs/toy/hiar.yaml"  # of the repository, whatever the working directory


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config_path", default=str(ROOT / DEFAULT_CONFIG), help=f"YAML config or preset name "
                   f"(default: the repository's {DEFAULT_CONFIG})")
    p.add_argument("--checkpoint_path", help="model weights (default: the config's runtime.checkpoint; none: random)")
    p.add_argument("--data_path", help="text file, one prompt a line (default: the config's runtime.prompts)")
    p.add_argument("--prompt", help="a single prompt (instead of --data_path)")
    p.add_argument("--extended_prompt_path", help="text file of extended prompts, one a line, paired line by line "
                   "with the prompts: videos are generated from the extended prompt and named by the original")
    p.add_argument("--switch", nargs=2, action="append", metavar=("TIME", "PROMPT"),
                   help="from TIME on, generate PROMPT: TIME is b<N> (block N) or <S>s (seconds); repeatable")
    p.add_argument("--prompt_schedule", help="text file of switches, one '<TIME> <PROMPT>' a line (as --switch)")
    p.add_argument("--switch_mode", choices=choices(SamplingConfig, "switch"),
                   help="what the caches hold after a switch (default: the config's sampling.switch)")
    p.add_argument("--image", help="continue this image: it is the video's first frame (clean context)")
    p.add_argument("--video", help="continue this video: its last frames are clean context; the output is the continuation")
    p.add_argument("--output_folder", default="outputs", help="where videos go (created if needed)")
    p.add_argument("--num_output_frames", type=int, help="latent frames per video (default: the config's)")
    p.add_argument("--use_ema", action="store_true", help="use the EMA weights of a training checkpoint")
    p.add_argument("--lora", action="append", metavar="PATH[:SCALE]",
                   help="a LoRA adapter (a LoRA run's adapter.safetensors) on the checkpoint it was trained on, its "
                        "update scaled by SCALE (default 1); repeatable: the adapters act together (docs/lora.md)")
    p.add_argument("--merge_lora", action="store_true",
                   help="fold the --lora adapters into the weights before generating (no adapter cost per forward)")
    # The choices are the config's own (sampling.method, sampling.schedule): one list to extend.
    p.add_argument("--inference_method", choices=choices(SamplingConfig, "method"),
                   help="order of the (block, step) cells (default: the config's)")
    p.add_argument("--num_frame_first_blocks", type=int, help="hybrid_block0: blocks denoised frame-first")
    p.add_argument("--schedule", choices=choices(SamplingConfig, "schedule"), help="execution of step-first cells")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num_samples", type=int, default=1, help="videos per prompt")
    p.add_argument("--save_with_index", action="store_true", help="name files by prompt index, not prompt text")
    p.add_argument("--save_latents", action="store_true", help="save final latents beside each mp4")
    p.add_argument("--decode_overlap", action="store_true",
                   help="decode block n while block n + 1 is generated (a worker thread; on CUDA a side stream): "
                        "the same frames, the decode's time hidden behind generation's")
    p.add_argument("--overwrite", action="store_true", help="replace existing files instead of picking new names")
    p.add_argument("--parallel", choices=["data", "pipeline"], default="data",
                   help="under torchrun: shard prompts across ranks (data) or run the steps as a pipeline, "
                        "one stage per rank (pipeline)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    return p.parse_intermixed_args(argv)  # options may follow the section.key=value overrides


def resolve_config(args: argparse.Namespace) -> Config:
    overrides = list(args.overrides)
    for flag, key in (("inference_method", "method"), ("schedule", "schedule"), ("switch_mode", "switch"),
                      ("num_frame_first_blocks", "num_frame_first_blocks")):
        if getattr(args, flag) is not None:
            overrides.append(f"sampling.{key}={getattr(args, flag)}")
    return load_config(args.config_path, overrides)


def with_output_frames(args: argparse.Namespace, cfg: Config) -> Config:
    """The config whose video.num_latent_frames is --num_output_frames (default: the config's own), a new
    config: the loaded one is frozen."""
    if args.num_output_frames is None:
        return cfg
    if args.num_output_frames < 1:  # 0 must not fall back to the config's length
        raise ValueError(f"--num_output_frames={args.num_output_frames} must be positive: use a multiple of "
                         f"video.frames_per_block={cfg.video.frames_per_block}")
    whole_blocks("--num_output_frames", args.num_output_frames, cfg.video.frames_per_block)  # names the flag
    return with_overrides(cfg, [f"video.num_latent_frames={args.num_output_frames}"])


def read_prompts(args: argparse.Namespace, cfg: Config) -> list[str]:
    """--prompt, or the lines of --data_path (default: the config's runtime.prompts file)."""
    if args.prompt is not None and args.data_path is not None:
        raise ValueError("give one of --prompt or --data_path, not both")
    if args.prompt is None and args.data_path is None:
        args.data_path = str(repo_path(cfg.runtime.prompts))
    if args.prompt is None:
        return prompt_lines(args.data_path)
    check_prompt(args.prompt, "--prompt")
    if not args.prompt.strip():
        raise ValueError("no prompts: --prompt is empty")
    return [args.prompt.strip()]


def read_extended_prompts(args: argparse.Namespace, prompts: list[str]) -> list[str] | None:
    """The lines of --extended_prompt_path, the n-th for the n-th prompt (blank lines skipped in both), or None."""
    if args.extended_prompt_path is None:
        return None
    extended = prompt_lines(args.extended_prompt_path)
    if len(extended) != len(prompts):
        source = f"prompt file {args.data_path}" if args.prompt is None else "--prompt"
        raise ValueError(f"extended prompt file {args.extended_prompt_path} has {len(extended)} prompt(s) but "
                         f"{source} has {len(prompts)}: give one extended prompt for each prompt, line by line")
    return extended


def check_parallel(args: argparse.Namespace, cfg: Config, world: int) -> None:
    """A pipeline runs the step-first order with at most one stage a step; in one process, a step_major
    sweep must fit its memory bound (`hiar.sampling.check_step_major`)."""
    if args.parallel == "pipeline":
        if cfg.sampling.method != "timestep_first":
            raise ValueError("--parallel pipeline runs the step-first order: use --inference_method timestep_first")
        stage_steps(len(cfg.schedule.denoising_steps), world)
    else:
        check_step_major(cfg.sampling.schedule, cfg.sampling.method, block_noise(cfg, 0, [0]).block_shape,
                         args.num_samples, cfg.geometry.num_blocks)


def checked_device(name: str, world: int) -> torch.device:
    """--device as a torch device (cuda:LOCAL_RANK under a launcher), refused when this machine lacks it."""
    try:
        device = local_rank_device(name) if world > 1 else torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name} is not a device: use cpu or cuda") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise ValueError(f"--device {name}: inference runs on cpu or cuda only")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise ValueError(f"--device {name}: this machine has no usable CUDA GPU (torch {torch.__version__}); "
                         "use --device cpu")
    if (device.index or 0) >= count:
        raise ValueError(f"--device {device}: this machine has {count} CUDA GPU(s); use cuda:0 to cuda:{count - 1}")
    return device


@dataclasses.dataclass(frozen=True)
class Inputs:
    """Every input of a run, as `check_inputs` accepted it."""
    cfg: Config  # video.num_latent_frames: the length generated
    prompts: list[str]
    extended: list[str] | None  # per prompt: the text generated from (--extended_prompt_path)
    switches: list[tuple[int, str]]  # (block, prompt) after the first block, in order
    prefix: torch.Tensor | None  # frames to continue [1, F, 3, H, W] (--image, --video)
    folder: Path
    device: torch.device


def check_inputs(args: argparse.Namespace, world: int) -> Inputs:
    """Every input, before any compute and before any model is loaded: the first problem raises."""
    cfg = with_output_frames(args, resolve_config(args))
    prompts = read_prompts(args, cfg)
    extended = read_extended_prompts(args, prompts)
    checkpoint = generator_path(args.checkpoint_path, cfg)
    if checkpoint:
        check_checkpoint_path(checkpoint)
    for path, _ in adapter_specs(args.lora, args.merge_lora):
        read_adapter(path, tensors=False).check_fits(cfg.model)
    if args.num_samples < 1:
        raise ValueError(f"--num_samples={args.num_samples} must be at least 1")
    check_parallel(args, cfg, world)
    switches = read_switches(args, cfg)
    v = cfg.video
    prefix = read_prefix_video(args.image, args.video, v.height, v.width, v.vae_stride[0])
    folder = writable_folder(args.output_folder)
    return Inputs(cfg, prompts, extended, switches, prefix, folder, checked_device(args.device, world))


def read_switches(args: argparse.Namespace, cfg: Config) -> list[tuple[int, str]]:
    """--switch and --prompt_schedule as (block, prompt), checked against the video's blocks."""
    entries = [tuple(s) for s in args.switch or []]
    if args.prompt_schedule:
        try:
            lines = Path(args.prompt_schedule).read_text().splitlines()
        except (OSError, UnicodeDecodeError) as err:
            raise ValueError(f"cannot read --prompt_schedule {args.prompt_schedule}: {err}") from None
        entries += read_schedule(lines, args.prompt_schedule)
    v, num_blocks = cfg.video, cfg.geometry.num_blocks
    for at, prompt in entries:
        check_prompt(prompt, f"the switch at {at}")
    switches = sorted((parse_switch_time(at, v.fps, v.vae_stride[0], v.frames_per_block), prompt) for at, prompt in entries)
    blocks = [b for b, _ in switches]
    if blocks and blocks[0] == 0:
        raise ValueError("a switch at block 0 replaces the prompt: give it as --prompt instead")
    if len(set(blocks)) != len(blocks):
        raise ValueError(f"two switches at the same block: {blocks}")
    if blocks and blocks[-1] >= num_blocks:
        raise ValueError(f"a switch at block {blocks[-1]} lies beyond the video's {num_blocks} blocks "
                         f"({v.num_latent_frames} latent frames): lengthen it with --num_output_frames")
    return switches


def output_stem(prompt: str, index: int, sample: int, by_index: bool) -> str:
    if by_index:
        return f"{index}-{sample}"
    return video_stem(prompt, sample)  # VBench's {prompt}-{sample}, whole (hiar/videoset.py)


def claim_outputs(folder: Path, stem: str, latents: bool, overwrite: bool) -> list[Claim]:
    """Claims of folder/stem.mp4 (and its .latents.safetensors), or of the first 'stem (2)', 'stem (3)',
    ... free for both: created exclusively, so no other process or rank writes the same name."""
    return claim_free(folder, stem, (".mp4", ".latents.safetensors") if latents else (".mp4",), overwrite)


def save_run_config(cfg: Config, folder: Path, overwrite: bool) -> Path:
    """The resolved config as folder/config.yaml, or 'config (2).yaml', ... beside an existing one."""
    (claim,) = claim_free(folder, "config", (".yaml",), overwrite)
    return claim.write(yaml.safe_dump(config_to_dict(cfg), sort_keys=False).encode())


def build_generator(args: argparse.Namespace, cfg: Config) -> WanModel:
    """The student (--checkpoint_path, else the config's runtime.checkpoint, else random weights) with the
    --lora adapters applied."""
    path = generator_path(args.checkpoint_path, cfg)
    if path:
        model = load_generator(path, cfg, args.use_ema)[0]
    else:
        print("\n" + "!" * 78 + "\n!! WARNING: no --checkpoint_path: the model has RANDOM weights. The videos show\n"
              "!! noise, not the prompt. Pass a checkpoint for real results.\n" + "!" * 78 + "\n", file=sys.stderr)
        torch.manual_seed(0)
        model = WanModel(cfg.model)
    return load_adapters(model, adapter_specs(args.lora, args.merge_lora), args.merge_lora)


def build_generation(args: argparse.Namespace, inputs: Inputs) -> Generation:
    """The codec, the pipeline's process group (--parallel pipeline), the text encoder and the generator."""
    cfg, device = inputs.cfg, inputs.device
    codec = build_codec(cfg, device)
    group = StageGroup(len(cfg.schedule.denoising_steps)) if args.parallel == "pipeline" else None
    text_encoder = build_text_encoder(cfg, device)
    model = build_generator(args, cfg)
    dtype = cfg.torch_dtype(device)
    prefix = None
    if inputs.prefix is not None:
        with torch.no_grad():
            latents = codec.encode(inputs.prefix.to(device))
        prefix = context_latents(latents, cfg.video.window_frames, cfg.video.frames_per_block).to(device, dtype)
    return Generation(cfg, model.to(device, dtype).eval(), text_encoder, codec, group, device, dtype, inputs.extended,
                      inputs.switches, prefix, prefix_out=args.video is None)


def this_rank(generation: Generation) -> int:
    """The pipeline stage, else torchrun's RANK (0 without a launcher)."""
    return generation.group.rank if generation.group else int(os.environ.get("RANK", 0))


def write_videos(args: argparse.Namespace, inputs: Inputs, generation: Generation,
                 world: int) -> tuple[int, float, float | None]:
    """This process's prompts (data parallel: every world-th; a pipeline: all, in its stage's part),
    each finished block streamed to its file; the config first. Returns what `Generation.run` does."""
    cfg, group, rank = inputs.cfg, generation.group, this_rank(generation)
    prompts = list(enumerate(inputs.prompts))
    jobs = prompts if group else [(i, p) for i, p in prompts if i % world == rank]  # each claims its names as it runs
    num_blocks = cfg.geometry.num_blocks
    steps = len(group.steps) if group else len(cfg.schedule.denoising_steps)
    bar = tqdm(total=len(jobs) * num_blocks * steps, unit="cell", desc=f"{cfg.sampling.method} (rank {rank})",
               disable=rank != 0)
    if rank == 0:
        save_run_config(cfg, inputs.folder, args.overwrite)
    result = generation.run(jobs, num_blocks, inputs.folder, args, bar)
    bar.close()
    return result


def report(generation: Generation, result: tuple[int, float, float | None], world: int) -> None:
    """Speed: every data-parallel rank for itself; for a pipeline, rank 0 for the last stage."""
    frames, seconds, first_block = result
    group, cfg = generation.group, generation.cfg
    if group:
        received = group.send_to_first([frames, seconds, first_block or 0.0])
        group.close()
        if received is None:
            return
        frames, seconds, first_block = received
    print(f"rank {this_rank(generation)}: {frames:.0f} frames in {seconds:.1f} s: "
          f"{frames / max(seconds, 1e-9):.2f} frames/s, first block after {first_block or 0:.2f} s "
          f"({cfg.sampling.method}, {cfg.sampling.schedule}{f', {world}-stage pipeline' if group else ''}, "
          f"{generation.device})")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", 1))
    try:
        inputs = check_inputs(args, world)  # 1. every input, before any compute
        generation = build_generation(args, inputs)  # 2. the models
    except (ConfigError, ValueError, OSError, NotImplementedError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        result = write_videos(args, inputs, generation, world)  # 3. generate, streaming blocks to files
    except (PipelineError, OSError) as err:  # a stage died, or a file could not be written (it is named)
        print(f"error: {err}", file=sys.stderr)
        return 1
    report(generation, result, world)  # 4. speed
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
    extended: list[str] | None = None  # per prompt index: the text generated from (--extended_prompt_path)
    switches: list[tuple[int, str]] = dataclasses.field(default_factory=list)  # (block, prompt)
    prefix: torch.Tensor | None = None  # clean latents [1, P, C, h, w] continued
    prefix_out: bool = True  # the prefix's frames lead the video (an image), or not (a video continued)

    @torch.no_grad()  # every stage, not only the one that renders (autograd would also keep unfused passes)
    def run(self, jobs: list[tuple[int, str]], num_blocks: int, folder: Path, args: argparse.Namespace,
            bar: tqdm) -> tuple[int, float, float | None]:
        """Run every (prompt index, prompt) job; returns (frames written, seconds, first-block latency)."""
        frames, seconds, first_block = 0, 0.0, None
        writes = self.group is None or self.group.is_last
        if self.group:
            self.group.barrier()
        for index, prompt in jobs:
            if not writes:
                # this stage's cells; the last stage writes
                for _ in self.blocks(self.text_of(index, prompt), num_blocks, args, bar)[0]:
                    pass
                continue
            claims: list[list[Claim]] = []  # per sample: the video's, then the latents'
            try:
                for s in range(args.num_samples):  # claimed before this job's compute
                    stem = output_stem(prompt, index, s, args.save_with_index)
                    claims.append(claim_outputs(folder, stem, args.save_latents, args.overwrite))
                metadata = {"prompt": prompt, "prompt_index": str(index)}
                if self.extended:
                    metadata["extended_prompt"] = self.extended[index]
                if self.switches:
                    metadata["prompt_switches"] = json.dumps(self.switches)
                blocks, runner = self.blocks(self.text_of(index, prompt), num_blocks, args, bar)
                stream = Stream(blocks, self.codec, runner, runner.cond.prefix, self.prefix_out, args.decode_overlap)
                out = render(self.codec, self.cfg, stream,
                             [c[0] for c in claims], [c[1] for c in claims] if args.save_latents else None, metadata)
            finally:
                for claim in (c for sample in claims for c in sample):
                    claim.release()  # nothing for a published file; an unwritten claim's empty file goes
            frames, seconds = frames + out.video_frames * len(out.paths), seconds + out.seconds
            first_block = first_block if first_block is not None else out.first_block_seconds
            for path in out.paths:
                print(f"wrote {path} ({out.video_frames} frames)")
            record_prompts(folder, {path.name: prompt for path in out.paths})  # the manifest, prompts.json
        return frames, seconds, first_block

    def text_of(self, index: int, prompt: str) -> str:
        """What prompt `index` is generated from: its extended prompt when given, else the prompt itself."""
        return self.extended[index] if self.extended else prompt

    def conditioning(self, prompt: str, samples: int) -> Conditioning:
        """The prompt, its scheduled switches and the continued prefix, for `samples` samples."""
        def states(text: str) -> torch.Tensor:
            return self.text_encoder([text]).to(self.device, self.dtype).expand(samples, -1, -1)

        segments = [Segment(0, states(prompt), (prompt,))]
        segments += [Segment(block, states(text), (text,)) for block, text in self.switches]
        prefix = None if self.prefix is None else self.prefix.expand(samples, -1, -1, -1, -1)
        return Conditioning(segments, prefix)

    def blocks(self, prompt: str, num_blocks: int, args: argparse.Namespace, bar: tqdm) -> tuple[Blocks, CellRunner]:
        """The clean latent blocks of one prompt's samples (this stage's part of them, in a pipeline) and
        the runner making them."""
        noise = block_noise(self.cfg, args.seed, range(args.num_samples), self.device)
        runner = CellRunner(self.model, self.conditioning(prompt, args.num_samples), self.cfg, noise, on_cell=bar.update)
        return (pipeline_stage(runner, self.group, num_blocks) if self.group else run_order(runner, num_blocks)), runner


if __name__ == "__main__":
    sys.exit(main())
