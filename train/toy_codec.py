"""Train the toy world's Wan-shaped VAE (hiar/toycodec.py) on rendered toy clips; resumable.

    python train/toy_codec.py --config_path configs/toy/codec.yaml                # a fresh run
    python train/toy_codec.py --config_path configs/toy/codec.yaml --resume steps=4000   # continue it
    python train/toy_codec.py --config_path configs/toy/codec.yaml output_dir=runs/toy/codec_ft \
        init_from=runs/toy/codec/state.pt steps=500                  # a new run from another's weights
                                                  # (init_from=checkpoints/toy_vae_s4: an exported vae/ folder)

The recipe (configs/toy/codec.yaml) trains on short clips first, then on clips of random length at a
lower rate (the long-clip stage: long_from, max_frames, long_lr), so the causal decoder holds up over
the toy model's whole window.

Writes under output_dir: state.pt (model, optimizer, step, config; replaced atomically every save_every
steps and at the end), log.jsonl (loss, PSNR of the training batch, seconds into the run, and every
eval_every steps the round trip of 8 held-back clips, held_psnr and held_spread; a resume drops the
lines of steps after its state's), and at the end vae/ (a diffusers folder with the latents' mean
and std, loadable by hiar.codecs.WanVAE.from_folder) and ceiling.json: 16 held-out clips of 21 frames
through the VAE and back, measured as eval.toy_fidelity measures a model (colour, shape, direction,
count, presence; PSNR). A fresh run refuses a folder that holds a state.pt. Bad input ends it with one
line and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from hiar.atomic import atomic_path
from hiar.codecs import WanVAE
from hiar.config import ConfigError, repo_path
from hiar.toycodec import (build_toy_vae, clip_batch, export, latent_stats, learning_rate, load_codec_config,
                           load_state, reconstruction_loss, save_state, validate)
from hiar.toyfidelity import held_out_clips, round_trip


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config_path", default=str(repo_path("configs/toy/codec.yaml")),
                   help="the codec's YAML (default: the repository's configs/toy/codec.yaml)")
    p.add_argument("--resume", action="store_true", help="continue from output_dir/state.pt")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    return p.parse_intermixed_args(argv)


def initial_weights(path: Path) -> dict[str, torch.Tensor]:
    """The VAE weights of a run's state.pt, or of a folder holding an exported vae/ (such as the shipped
    checkpoints/toy_vae_s4, in fp16), in float32."""
    if path.is_file():
        return torch.load(path, map_location="cpu", weights_only=True)["vae"]
    return WanVAE.from_folder(path).vae.state_dict()  # loaded in float32


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_codec_config(args.config_path, args.overrides)
    except (ConfigError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = repo_path(cfg.output_dir)
    state = out / "state.pt"
    if state.exists() and not args.resume:
        print(f"error: {state} exists: continue it with --resume, or choose another output_dir", file=sys.stderr)
        return 2
    if cfg.init_from and not (repo_path(cfg.init_from).is_file() or (repo_path(cfg.init_from) / "vae").is_dir()):
        print(f"error: init_from={cfg.init_from}: no such state.pt, nor a folder with an exported vae/",
              file=sys.stderr)
        return 2
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)  # the initial weights
    vae = build_toy_vae(cfg)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=cfg.lr, betas=(0.9, 0.99))
    step = load_state(state, vae, optimizer) if args.resume and state.exists() else 0
    if step == 0 and cfg.init_from:
        try:
            vae.load_state_dict(initial_weights(repo_path(cfg.init_from)))
        except (RuntimeError, KeyError) as err:
            print(f"error: init_from={cfg.init_from} does not fit this VAE (base_dim, dim_mult, num_res_blocks): "
                  f"{str(err).splitlines()[0]}", file=sys.stderr)
            return 2
    out.mkdir(parents=True, exist_ok=True)
    forget_after(out / "log.jsonl", step)
    started = time.time()
    with open(out / "log.jsonl", "a") as log:
        while step < cfg.steps:
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(cfg, step)
            video = clip_batch(cfg, step)  # a pure function of seed and step
            loss, metrics = reconstruction_loss(vae, video, cfg.kl_weight, cfg.edge_weight, cfg.object_weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            if cfg.eval_every and step % cfg.eval_every == 0:
                metrics.update(validate(vae, cfg))
            if step % cfg.log_every == 0 or "held_psnr" in metrics:
                log.write(json.dumps({"step": step, **metrics, "lr": optimizer.param_groups[0]["lr"],
                                      "seconds": round(time.time() - started, 1)}) + "\n")
                log.flush()
                held = (f"; held-out {metrics['held_psnr']:.2f} dB, spread {metrics['held_spread']:.2f}"
                        if "held_psnr" in metrics else "")
                print(f"step {step}: l1 {metrics['l1']:.4f}, psnr {metrics['psnr']:.2f} dB{held}", flush=True)
            if step % cfg.save_every == 0 or step == cfg.steps:
                save_state(state, vae, optimizer, step, cfg)
    vae.eval()
    export(vae, out, *latent_stats(vae, cfg))
    codec = WanVAE.from_folder(out)
    ceiling = round_trip(codec, held_out_clips(16, cfg.height, cfg.width, motion=cfg.motion), 21)
    (out / "ceiling.json").write_text(json.dumps({"step": step, **ceiling}, indent=1))
    print(f"step {step}: round trip of 16 held-out clips: PSNR {ceiling['psnr']:.2f} dB, colour "
          f"{ceiling['colour']:.0%}, shape {ceiling['shape']:.0%}, direction {ceiling['direction']:.0%}; "
          f"wrote {out / 'vae'}, {out / 'ceiling.json'} ({time.time() - started:.0f} s this run)")
    return 0


def forget_after(log: Path, step: int) -> None:
    """Drop the log lines of steps after `step`: a run stopped between saves repeats them on resuming."""
    if log.exists():
        kept = [line for line in log.read_text().splitlines(keepends=True) if json.loads(line)["step"] <= step]
        with atomic_path(log) as tmp:
            tmp.write_text("".join(kept))


if __name__ == "__main__":
    sys.exit(main())
