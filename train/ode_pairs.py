"""Generate teacher ODE trajectories for ODE initialisation and the forward-KL regulariser.

    python train/ode_pairs.py --config_path configs/toy/ode_pairs.yaml
    torchrun --nproc_per_node=N train/ode_pairs.py --config_path ...     # shards split across ranks

Resumable: rerun the same command after a crash; each rank keeps its shards that are intact (record,
size and sha256 match) and makes again the missing, truncated or damaged ones (reading its shards back
costs ~85 GB a rank on 8 ranks at full scale, minutes against the hours of the run). A rerun with another
teacher or any setting that shapes a trajectory (`run_record`) into the same ode.output_dir stops before
any compute with exit code 2 (use another ode.output_dir, or --rebuild to replace the old trajectories).
Each process owns one device (`hiar.distributed`: GPU LOCAL_RANK under torchrun, else the CPU); the
teacher runs there in the run's precision, the noise is drawn on the CPU (the same bits on any device).
Disk: a trajectory stores K + 1 latents of F x C x h x w values (K = student steps), e.g. 5 x 21 x 16 x 60
x 104 x 4 bytes = 42 MB at full scale in float32 (ode.storage_dtype), so 16k trajectories take 670 GB
(half that in bfloat16).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
import torch
from tqdm import tqdm

from hiar import distributed
from hiar.checkpoints import load_generator
from hiar.config import kept_indices, load_config, repo_path, save_config
from hiar.data import PromptSource
from hiar.flow import FlowMatching
from hiar.trajectories import (MANIFEST, TrajectoryStore, claim, provenance_digest, record_path, shard_count, shard_path,
                      shard_problem, teacher_fingerprint, write_manifest, write_shard)
from hiar.sampling import guided, teacher_ode
from hiar.text import build_text_encoder
from hiar.training import main_guard


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config_path", default="configs/toy/ode_pairs.yaml")
    p.add_argument("--rebuild", action="store_true",
                   help="replace trajectories in ode.output_dir made with another teacher or other settings")
    p.add_argument("--verify", action="store_true",
                   help="only hash every shard of ode.output_dir against its manifest (a full set: ~670 GB read)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    return p.parse_intermixed_args(argv)  # options may follow the section.key=value overrides


def prompt_list(cfg) -> list[str]:
    # toyworld: captions (style train.captions) of clips the teacher never trained on (another seed)
    source = PromptSource(cfg.ode.prompts, cfg.ode.seed + 1_000_003, cfg.video.height, cfg.video.width, ROOT,
                          cfg.train.captions)
    return [source[i] for i in range(cfg.ode.num_trajectories)]


def trajectory_noise(cfg, index: int) -> torch.Tensor:
    """The starting noise [F, C, h, w] of trajectory `index`, drawn on the CPU from its own seed: the
    same bits whichever rank or device integrates it."""
    geo = cfg.geometry
    g = torch.Generator().manual_seed(cfg.ode.seed * 10**9 + index)
    return torch.randn(geo.num_latent_frames, cfg.model.in_channels, geo.latent_height, geo.latent_width, generator=g)


def run_record(cfg, prompts: list[str], device: torch.device) -> dict:
    """What run.json and the manifest record: the provenance (every input that shapes a trajectory, by its
    config name; a rerun must match it), its digest (stamped on each shard) and the teacher's files."""
    o, v = cfg.ode, cfg.video
    teacher = teacher_fingerprint(repo_path(o.teacher))
    provenance = {
        "format": 1,  # the shard layout (hiar/trajectories.py write_shard)
        "teacher.sha256": teacher["sha256"],  # content, not path: a moved teacher is the same teacher
        **{f"ode.{k}": getattr(o, k) for k in ("steps", "shift", "guidance_scale", "prompts", "num_trajectories",
                                               "per_shard", "seed", "storage_dtype")},
        "prompts.sha256": hashlib.sha256(json.dumps(prompts).encode()).hexdigest(),  # an edited prompt file too
        "keep": kept_indices(cfg),  # resolved from ode.keep / ode.keep_indices (and the student's steps)
        **{f"video.{k}": getattr(v, k) for k in ("height", "width", "codec", "vae_stride", "num_latent_frames")},
        # the attention backend changes rounding only, not the trajectory
        **{f"model.{f.name}": getattr(cfg.model, f.name) for f in dataclasses.fields(cfg.model)
           if f.name != "attention_backend"},
        "train.negative_prompt": cfg.train.negative_prompt,
        "runtime.dtype": str(cfg.torch_dtype(device)).removeprefix("torch."),  # resolved: "auto" differs by device
    }
    provenance = json.loads(json.dumps(provenance))  # tuples -> lists, as read back
    teacher = {"path": o.teacher, **teacher}
    return {"provenance": provenance, "digest": provenance_digest(provenance), "teacher": teacher}


def shards_to_make(cfg, out: Path, world, digest: str) -> list[int]:
    """This rank's shards that are not intact, each checked in full (its sha256 read back); their records
    are removed, so that no rank lists them in a manifest before they are made again."""
    o = cfg.ode
    todo = []
    for shard in range(world.rank, -(-o.num_trajectories // o.per_shard), world.size):
        problem = shard_problem(out, shard, shard_count(o.per_shard, o.num_trajectories, shard), digest, checksum=True)
        if problem not in (None, "missing"):
            print(f"{shard_path(out, shard)}: {problem}; making it again", file=sys.stderr)
        if problem is not None:
            record_path(shard_path(out, shard)).unlink(missing_ok=True)
            todo.append(shard)
    return todo


def main(argv=None) -> None:
    args = parse_args(argv)
    cfg = load_config(args.config_path, args.overrides)
    o = cfg.ode
    if args.verify:
        print(f"{o.output_dir}: {TrajectoryStore(repo_path(o.output_dir)).verify()} shards match their sha256")
        return
    world = distributed.init()
    device = world.device
    out = repo_path(o.output_dir)
    prompts = prompt_list(cfg)
    num_shards = -(-o.num_trajectories // o.per_shard)
    run = run_record(cfg, prompts, device)
    claim(out, run, args.rebuild, num_shards)  # refuses another run's folder before any compute
    todo = shards_to_make(cfg, out, world, run["digest"])
    if todo:  # the manifest exists only while every shard is finished
        (out / MANIFEST).unlink(missing_ok=True)
    # bfloat16 on CUDA (runtime.dtype)
    teacher, _ = load_generator(repo_path(o.teacher), cfg, dtype=cfg.torch_dtype(device))
    teacher.requires_grad_(False).eval().to(device)
    encoder = build_text_encoder(cfg, device)
    flow = FlowMatching(o.shift)
    grid = flow.sampling_timesteps(o.steps)
    keep = kept_indices(cfg)
    negative = encoder([cfg.train.negative_prompt]).to(device)
    bar = tqdm(total=sum(min(o.per_shard, o.num_trajectories - s * o.per_shard) for s in todo), unit="trajectory",
               disable=not world.is_main)
    for shard in todo:
        indices = range(shard * o.per_shard, min((shard + 1) * o.per_shard, o.num_trajectories))
        records = []
        for start in range(indices.start, indices.stop, o.batch_size):
            batch = list(range(start, min(start + o.batch_size, indices.stop)))
            noise = torch.stack([trajectory_noise(cfg, i) for i in batch]).to(device)
            denoiser = guided(teacher, encoder([prompts[i] for i in batch]).to(device), negative, o.guidance_scale)
            final, points = teacher_ode(denoiser, grid, noise, flow, keep)
            final, points = final.cpu(), {k: points[k].cpu() for k in keep}  # shards are written from the host
            for b, i in enumerate(batch):
                records.append({"key": f"{i:08d}", "caption": prompts[i], "final": final[b],
                                "points": torch.stack([points[k][b] for k in keep]),
                                "timesteps": [grid[k].item() for k in keep]})
            bar.update(len(batch))
        write_shard(shard_path(out, shard), records, getattr(torch, o.storage_dtype), run["digest"])
    bar.close()
    # The rank that finds every shard on disk finished (by its record, for this run's settings) writes the
    # manifest (atomically; two that finish together write the same file). No barrier: ranks finish up to
    # a shard's time (tens of minutes at full scale) apart, past a collective's timeout.
    if all(shard_problem(out, s, shard_count(o.per_shard, o.num_trajectories, s), run["digest"], checksum=False)
           is None for s in range(num_shards)):
        save_config(cfg, out / "config.yaml")
        info = {"keep": keep, "keep_timesteps": [grid[k].item() for k in keep], "storage_dtype": o.storage_dtype,
                **run}
        print(f"manifest: {write_manifest(out, num_shards, o.per_shard, o.num_trajectories, info, run['digest'])}")
    else:
        print(f"rank {world.rank}: its shards are written; the last rank to finish writes the manifest")


if __name__ == "__main__":
    main_guard(main)  # a refused folder or a bad setting: its message and exit code 2
