"""ODE initialisation of the causal student (CausVid): regress the teacher's trajectories.

    deepspeed train/ode_init.py --config_path configs/toy/ode_init.yaml
    python train/ode_init.py --config_path configs/toy/ode_init.yaml --resume

The student starts from the teacher's weights and, under the block-causal mask, predicts each
trajectory's clean end from a point of it, a random stored point per block (per-frame timesteps).
Trajectories come from train/ode_pairs.py (ode.output_dir) and are read from their shards as batches
need them (`hiar.ode.TrajectoryStore`), so a full-scale set (~340 GB) never has to fit in memory.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hiar.checkpoints import load_generator  # noqa: E402
from hiar.config import load_config  # noqa: E402
from hiar.flow import FlowMatching  # noqa: E402
from hiar.models import BlockCausal, BlockCausalWindow  # noqa: E402
from hiar.ode import TrajectoryStore  # noqa: E402
from hiar.text import build_text_encoder  # noqa: E402
from hiar.toytrain import PromptBank, ode_regression_batch  # noqa: E402
from hiar.training import Trainer, main_guard  # noqa: E402


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
    trajectories = TrajectoryStore(cfg.ode.output_dir)  # read on demand: full scale is ~340 GB
    student, _ = load_generator(cfg.ode.teacher, cfg)  # the student starts as the teacher
    bank = PromptBank(build_text_encoder(cfg))
    flow = FlowMatching(cfg.schedule.shift)
    causal = BlockCausal(BlockCausalWindow.from_config(cfg.video))
    trainer = Trainer(cfg, student, resume=args.resume)

    def step_fn(step):
        x, t, target, captions = ode_regression_batch(trajectories, cfg, step, trainer.rank, trainer.world)
        x0 = flow.x0_from_flow(x, trainer.engine(x, t, bank(captions), causal), t)
        return trainer.update((x0.float() - target.float()).square().mean())

    trainer.fit(step_fn)
    if trainer.step >= cfg.train.steps:
        trainer.log(f"model: {trainer.export()}")


if __name__ == "__main__":
    main_guard(main)
