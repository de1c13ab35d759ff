"""Generate teacher ODE trajectories for ODE initialisation and the forward-KL regulariser.

    python train/ode_pairs.py --config_path configs/toy/ode_pairs.yaml
    torchrun --nproc_per_node=N train/ode_pairs.py --config_path ...     # shards split across ranks

Resumable: rerun the same command after a crash; finished shards are kept, missing ones are made.
Disk: a trajectory stores K + 1 latents of F x C x h x w values (K = student steps), e.g. 5 x 21 x 16 x 60
x 104 x 2 bytes = 21 MB at full scale in float16, so 16-20k trajectories take 330-420 GB.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from hiar.checkpoints import load_generator  # noqa: E402
from hiar.config import load_config, save_config  # noqa: E402
from hiar.data import PromptSource  # noqa: E402
from hiar.flow import FlowMatching  # noqa: E402
from hiar.ode import aligned_indices, shard_path, write_manifest, write_shard  # noqa: E402
from hiar.sampling import guided, teacher_ode  # noqa: E402
from hiar.text import build_text_encoder  # noqa: E402
from hiar.training import init_distributed  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config_path", default="configs/toy/ode_pairs.yaml")
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    return p.parse_intermixed_args(argv)  # options may follow the section.key=value overrides


def prompt_list(cfg) -> list[str]:
    # toyworld: captions of clips the teacher never trained on (another seed)
    source = PromptSource(cfg.ode.prompts, cfg.ode.seed + 1_000_003, cfg.video.height, cfg.video.width, ROOT)
    return [source[i] for i in range(cfg.ode.num_trajectories)]


def main(argv=None) -> None:
    args = parse_args(argv)
    cfg = load_config(args.config_path, args.overrides)
    o, geo = cfg.ode, cfg.geometry
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    out = Path(o.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    prompts = prompt_list(cfg)
    num_shards = -(-o.num_trajectories // o.per_shard)
    todo = [s for s in range(rank, num_shards, world) if not shard_path(out, s).is_file()]
    teacher, _ = load_generator(o.teacher, cfg)
    teacher.eval()
    encoder = build_text_encoder(cfg)
    flow = FlowMatching(o.shift)
    grid = flow.sampling_timesteps(o.steps)
    student = FlowMatching(cfg.schedule.shift).denoising_timesteps(cfg.schedule.denoising_steps, cfg.schedule.warp)
    keep = aligned_indices(grid, student)
    negative = encoder([cfg.train.negative_prompt])
    bar = tqdm(total=sum(min(o.per_shard, o.num_trajectories - s * o.per_shard) for s in todo), unit="trajectory",
               disable=rank != 0)
    for shard in todo:
        indices = range(shard * o.per_shard, min((shard + 1) * o.per_shard, o.num_trajectories))
        records = []
        for start in range(indices.start, indices.stop, o.batch_size):
            batch = list(range(start, min(start + o.batch_size, indices.stop)))
            noise = torch.stack([torch.randn(geo.num_latent_frames, cfg.model.in_channels, geo.latent_height,
                                             geo.latent_width, generator=torch.Generator().manual_seed(o.seed * 10**9 + i))
                                 for i in batch])
            denoiser = guided(teacher, encoder([prompts[i] for i in batch]), negative, o.guidance_scale)
            final, points = teacher_ode(denoiser, grid, noise, flow, keep)
            for b, i in enumerate(batch):
                records.append({"key": f"{i:08d}", "caption": prompts[i], "final": final[b],
                                "points": torch.stack([points[k][b] for k in keep]),
                                "timesteps": [grid[k].item() for k in keep]})
            bar.update(len(batch))
        write_shard(shard_path(out, shard), records, getattr(torch, o.storage_dtype))
    bar.close()
    if world > 1:
        init_distributed()
        torch.distributed.barrier()  # every rank's shards are on disk
    if rank == 0:
        save_config(cfg, out / "config.yaml")
        print(f"manifest: {write_manifest(out, num_shards, o.per_shard, o.num_trajectories, {'keep': keep})}")


if __name__ == "__main__":
    main()
