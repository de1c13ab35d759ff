"""Generate teacher ODE trajectories for ODE initialisation and the forward-KL regulariser.

    python train/ode_pairs.py --config_path configs/toy/ode_pairs.yaml
    torchrun --nproc_per_node=N train/ode_pairs.py --config_path ...     # shards split across ranks

Resumable: rerun the same command after a crash; finished shards are kept, missing ones are made.
Each process owns one device (`hiar.distributed`: GPU LOCAL_RANK under torchrun, else the CPU); the
teacher runs there in the run's precision, the noise is drawn on the CPU (the same bits on any device).
Disk: a trajectory stores K + 1 latents of F x C x h x w values (K = student steps), e.g. 5 x 21 x 16 x 60
x 104 x 4 bytes = 42 MB at full scale in float32 (ode.storage_dtype), so 16k trajectories take 670 GB
(half that in bfloat16).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from hiar import distributed  # noqa: E402
from hiar.checkpoints import load_generator  # noqa: E402
from hiar.config import kept_indices, load_config, save_config  # noqa: E402
from hiar.data import PromptSource  # noqa: E402
from hiar.flow import FlowMatching  # noqa: E402
from hiar.ode import shard_path, write_manifest, write_shard  # noqa: E402
from hiar.sampling import guided, teacher_ode  # noqa: E402
from hiar.text import build_text_encoder  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config_path", default="configs/toy/ode_pairs.yaml")
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    return p.parse_intermixed_args(argv)  # options may follow the section.key=value overrides


def prompt_list(cfg) -> list[str]:
    # toyworld: captions of clips the teacher never trained on (another seed)
    source = PromptSource(cfg.ode.prompts, cfg.ode.seed + 1_000_003, cfg.video.height, cfg.video.width, ROOT)
    return [source[i] for i in range(cfg.ode.num_trajectories)]


def trajectory_noise(cfg, index: int) -> torch.Tensor:
    """The starting noise [F, C, h, w] of trajectory `index`, drawn on the CPU from its own seed: the
    same bits whichever rank or device integrates it."""
    geo = cfg.geometry
    g = torch.Generator().manual_seed(cfg.ode.seed * 10**9 + index)
    return torch.randn(geo.num_latent_frames, cfg.model.in_channels, geo.latent_height, geo.latent_width, generator=g)


def main(argv=None) -> None:
    args = parse_args(argv)
    cfg = load_config(args.config_path, args.overrides)
    o = cfg.ode
    world = distributed.init()
    device = world.device
    out = Path(o.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    prompts = prompt_list(cfg)
    num_shards = -(-o.num_trajectories // o.per_shard)
    todo = [s for s in range(world.rank, num_shards, world.size) if not shard_path(out, s).is_file()]
    teacher, _ = load_generator(o.teacher, cfg, dtype=cfg.torch_dtype(device))  # bfloat16 on CUDA (runtime.dtype)
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
        write_shard(shard_path(out, shard), records, getattr(torch, o.storage_dtype))
    bar.close()
    # The rank that finds every shard on disk writes the manifest (atomically; two that finish together
    # write the same file). No barrier: ranks finish up to a shard's time (tens of minutes at full
    # scale) apart, past a collective's timeout.
    if all(shard_path(out, s).is_file() for s in range(num_shards)):
        save_config(cfg, out / "config.yaml")
        info = {"keep": keep, "keep_timesteps": [grid[k].item() for k in keep], "storage_dtype": o.storage_dtype}
        print(f"manifest: {write_manifest(out, num_shards, o.per_shard, o.num_trajectories, info)}")
    else:
        print(f"rank {world.rank}: its shards are written; the last rank to finish writes the manifest")


if __name__ == "__main__":
    main()
