"""How far, and in which direction, training moved a student's weights from a reference: for each
checkpoint, the norm of its difference from the reference relative to the reference's norm, and the
cosine between every two of those differences.

    python scripts/weight_moves.py runs/toy/ode_init/model.safetensors \
        runs/toy/hiar/checkpoints/step-00000200/model.pt runs/toy/hiar/checkpoints/step-00000300/model.pt

Each checkpoint is any layout eval.toy_fidelity and inference.py load (a training checkpoint's model.pt:
its generator; --use_ema: its EMA), read with the reference's config, so every one must have the
reference's architecture. With --out it writes the weights of another move instead, for
eval.toy_fidelity to measure: --along A, the reference moved A times the way to the one checkpoint
given; --random SEED, the reference moved in a random direction, tensor by tensor as far as that
checkpoint moved it (the same size of move, without its direction):

    python scripts/weight_moves.py runs/toy/ode_init/model.safetensors STEP/model.pt --along 0.5 --out half.safetensors

Why it exists: a generator whose fidelity swings by 10-15 points between checkpoints 100 iterations
apart is read against how far, and which way, its weights moved (docs/toy_prompts.md, "Why the student
draws fewer objects than its initialisation").
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hiar.checkpoints import CheckpointError, checkpoint_config, load_generator, save_model  # noqa: E402


def flat_weights(path: str, cfg, use_ema: bool) -> torch.Tensor:
    """Every floating-point parameter and buffer of the checkpoint, in one float64 vector."""
    model, _ = load_generator(path, cfg, use_ema=use_ema)
    return torch.cat([t.detach().double().flatten() for t in model.state_dict().values() if t.is_floating_point()])


def moves(reference: torch.Tensor, others: list[torch.Tensor]) -> tuple[list[float], list[list[float]]]:
    """(|w - reference| / |reference| for each w, the cosines between the differences w - reference)."""
    deltas = [w - reference for w in others]
    relative = [(d.norm() / reference.norm()).item() for d in deltas]
    cosines = [[torch.nn.functional.cosine_similarity(a, b, dim=0).item() for b in deltas] for a in deltas]
    return relative, cosines


def moved_model(reference: str, checkpoint: str, cfg, use_ema: bool, along: float | None, seed: int | None):
    """The reference's model moved `along` times the way to `checkpoint`, or, with `seed`, by a random
    direction scaled tensor by tensor to the norm of that checkpoint's move."""
    model, _ = load_generator(reference, cfg)
    target = load_generator(checkpoint, cfg, use_ema=use_ema)[0].state_dict()
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    with torch.no_grad():
        for name, w in model.state_dict().items():
            if not w.is_floating_point():
                continue
            move = target[name] - w
            if generator is not None:
                noise = torch.randn(w.shape, generator=generator)
                move = noise * (move.norm() / noise.norm().clamp_min(1e-12))
            w.add_(move if along is None else along * move)
    return model


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("reference", help="the weights the moves are measured from (e.g. the ODE initialisation)")
    p.add_argument("checkpoints", nargs="+", help="the checkpoints whose moves are measured")
    p.add_argument("--use_ema", action="store_true", help="training checkpoints: their EMA, not their generator")
    p.add_argument("--out", help="write a moved model here (.safetensors) instead of measuring: needs --along or "
                                 "--random and one checkpoint")
    p.add_argument("--along", type=float, help="--out: the reference moved this many times the way to the checkpoint")
    p.add_argument("--random", type=int, metavar="SEED", help="--out: the reference moved as far as the "
                   "checkpoint moved it, tensor by tensor, in a random direction drawn from SEED")
    args = p.parse_args(argv)
    moves_given = (args.along is not None) + (args.random is not None)
    if (args.out and (moves_given != 1 or len(args.checkpoints) != 1)) or (not args.out and moves_given):
        print("error: --out writes one move of one checkpoint: give --out with either --along or --random",
              file=sys.stderr)
        return 2
    try:
        cfg = checkpoint_config(args.reference)
        if args.out:
            model = moved_model(args.reference, args.checkpoints[0], cfg, args.use_ema, args.along, args.random)
            print(f"wrote {save_model(model, cfg, args.out)}")
            return 0
        reference = flat_weights(args.reference, cfg, False)
        others = [flat_weights(path, cfg, args.use_ema) for path in args.checkpoints]
    except (CheckpointError, OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    relative, cosines = moves(reference, others)
    names = [f"{i + 1}" for i in range(len(others))]
    print(f"reference: {args.reference} (norm {reference.norm().item():.4g}, {reference.numel()} weights)\n")
    print("| # | checkpoint | moved, relative | " + " | ".join(f"cos with {n}" for n in names) + " |")
    print("| --- " * (3 + len(names)) + "|")
    for name, path, r, row in zip(names, args.checkpoints, relative, cosines):
        print(f"| {name} | {path} | {r:.4%} | " + " | ".join(f"{c:+.3f}" for c in row) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
