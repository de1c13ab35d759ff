"""Time one training step of the toy teacher (flow matching, batch and geometry of its config) with and
without train.autocast and train.compile_blocks, on this machine's CPU cores; prints seconds a step.

    python scripts/bench_train_step.py                                  # the recipe's teacher (1x1-latent tokens)
    python scripts/bench_train_step.py "model.patch_size=[1,2,2]"       # the previous recipe's 2x2-latent tokens

One fixed batch (data and prompts are made once: the step alone is timed), two warm-up steps a setting
(compilation happens there), then the mean of --repeats. The settings run in one process, one after the
other, so run it on an idle machine: numbers are for comparing the settings, not other machines.
"""

from __future__ import annotations

import argparse
import time

import torch

from hiar.codecs import build_codec
from hiar.config import TrainConfig, load_config
from hiar.flow import FlowMatching
from hiar.models import WanModel
from hiar.text import PromptBank
from hiar.toyteacher import flow_matching_loss, toy_batch
from hiar.training import apply_cpu_speedups

SETTINGS = [("float32", {}), ("autocast", {"autocast": True}), ("compile_blocks", {"compile_blocks": True}),
            ("autocast + compile_blocks", {"autocast": True, "compile_blocks": True})]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config_path", default="configs/toy/teacher.yaml")
    p.add_argument("--repeats", type=int, default=4)
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    args = p.parse_args()
    cfg = load_config(args.config_path, args.overrides)
    cpu = torch.device("cpu")
    codec, bank = build_codec(cfg, cpu), PromptBank.for_config(cfg, cpu)
    flow = FlowMatching(cfg.train.timestep_shift)
    x0, captions = toy_batch(cfg, codec, range(cfg.train.batch_size))
    text = bank(captions)
    print(f"latents {tuple(x0.shape)}, {torch.get_num_threads()} threads")
    for name, options in SETTINGS:
        torch.manual_seed(0)
        model = WanModel(cfg.model).train()
        apply_cpu_speedups(model, TrainConfig(**options))
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr)

        def step():
            flow_matching_loss(model, x0, text, flow, context_noise=cfg.train.context_noise).backward()
            optimizer.step()
            optimizer.zero_grad()

        for _ in range(2):
            step()
        start = time.perf_counter()
        for _ in range(args.repeats):
            step()
        print(f"{name:<26} {(time.perf_counter() - start) / args.repeats:.3f} s a step")


if __name__ == "__main__":
    main()
