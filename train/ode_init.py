"""ODE initialisation of the causal student (CausVid): regress the teacher's trajectories.

    deepspeed train/ode_init.py --config_path configs/toy/ode_init.yaml
    python train/ode_init.py --config_path configs/toy/ode_init.yaml --resume

The student starts from the teacher's weights and, under the block-causal mask, predicts each
trajectory's clean end from a point of it, a random stored point per block (per-frame timesteps).
Trajectories come from train/ode_pairs.py (ode.output_dir) and are read from their shards as batches
need them (`hiar.trajectories.TrajectoryStore`), so a full-scale set (~340 GB) never has to fit in memory.
"""

from __future__ import annotations

import argparse

import torch

from hiar import distributed
from hiar.checkpoints import load_generator
from hiar.config import load_config, repo_path
from hiar.flow import FlowMatching
from hiar.models import BlockCausal, BlockCausalWindow
from hiar.trajectories import TrajectoryStore, ode_regression_batch
from hiar.order import ShuffledOrder
from hiar.text import PromptBank
from hiar.training import Trainer, main_guard


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config_path", default="configs/toy/ode_init.yaml")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    p.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    return p.parse_intermixed_args(argv)  # options may follow the section.key=value overrides


def main(argv=None) -> None:
    args = parse_args(argv)
    cfg = load_config(args.config_path, args.overrides)
    world = distributed.init()
    trajectories = TrajectoryStore(repo_path(cfg.ode.output_dir))  # read on demand: full scale is hundreds of GB
    student, _ = load_generator(repo_path(cfg.ode.teacher), cfg)  # the student starts as the teacher
    bank = PromptBank.for_config(cfg, world.device)
    flow = FlowMatching(cfg.schedule.shift)
    causal = BlockCausal(BlockCausalWindow.from_config(cfg.video))
    trainer = Trainer(cfg, student, resume=args.resume, world=world)
    order = ShuffledOrder(len(trajectories), cfg.train.seed, world.size, world.rank)

    def micro_loss(step: int, micro: int) -> torch.Tensor:
        indices = order.draw(step * trainer.accumulation + micro, cfg.train.batch_size)
        x, t, target, captions = (v.to(world.device) if torch.is_tensor(v) else v
                                  for v in ode_regression_batch(trajectories, cfg, indices))
        x0 = flow.x0_from_flow(x, trainer.engine(x, t, bank(captions), causal), t)
        return (x0.float() - target.float()).square().mean()

    def step_fn(step):
        return trainer.update(lambda micro: micro_loss(step, micro))

    trainer.fit(step_fn)
    if trainer.step >= cfg.train.steps:
        trainer.log(f"model: {trainer.export()}")


if __name__ == "__main__":
    main_guard(main)
