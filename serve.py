"""The live demo: a page in the browser that streams a video as it is generated and steers it.

    python serve.py                      # the toy default on the CPU; open http://127.0.0.1:8000
    python serve.py --config_path configs/hiar.yaml --checkpoint_path ckpts/hiar.pt --use_ema   # Wan, on a GPU

Takes every config and checkpoint inference.py does; trailing `section.key=value` arguments override
the config. Binds to 127.0.0.1 unless --host says otherwise. The page, protocol and limits:
hiar/serve.py and docs/demo.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import uvicorn

from hiar.checkpoints import CheckpointError, adapter_specs, generator_path, load_adapters, load_generator
from hiar.codecs import build_codec
from hiar.config import ConfigError, SamplingConfig, choices, load_config
from hiar.serve import Engine, Limits, create_app
from hiar.text import build_text_encoder

ROOT = Path(__file__).resolve().parent
DEFAULT_CONFIG = "configs/toy/hiar.yaml"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    defaults = Limits()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config_path", default=str(ROOT / DEFAULT_CONFIG), help=f"YAML config or preset name "
                   f"(default: the repository's {DEFAULT_CONFIG})")
    p.add_argument("--checkpoint_path", help="model weights (default: the config's runtime.checkpoint)")
    p.add_argument("--use_ema", action="store_true", help="use the EMA weights of a training checkpoint")
    p.add_argument("--lora", action="append", metavar="PATH[:SCALE]",
                   help="a LoRA adapter (adapter.safetensors) applied to the student, scaled by SCALE (default 1); "
                        "repeatable (docs/lora.md)")
    p.add_argument("--merge_lora", action="store_true", help="fold the --lora adapters into the weights")
    p.add_argument("--switch_mode", choices=choices(SamplingConfig, "switch"),
                   help="what the caches hold after a prompt switch (default: the config's sampling.switch)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max_streams", type=int, default=defaults.max_streams,
                   help="streams generating at once over all pages; one more is refused")
    p.add_argument("--max_seconds", type=float, default=defaults.max_seconds, help="seconds of video a stream may last")
    p.add_argument("--idle_timeout", type=float, default=defaults.idle_timeout,
                   help="seconds without a message from a page before its connection is closed")
    p.add_argument("--max_prompt_chars", type=int, default=defaults.max_prompt_chars)
    p.add_argument("--ahead_blocks", type=int, default=defaults.ahead_blocks,
                   help="blocks generated ahead of what the page shows (more: smoother, slower to steer)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    return p.parse_intermixed_args(argv)


def build_engine(args: argparse.Namespace) -> Engine:
    """The config, its student (--checkpoint_path, else the config's runtime.checkpoint), codec and text
    encoder on --device. A demo of random weights would show noise: no checkpoint is an error here."""
    switch = [f"sampling.switch={args.switch_mode}"] if args.switch_mode else []
    cfg = load_config(args.config_path, [*args.overrides, *switch])
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: this machine has no usable CUDA GPU; use --device cpu")
    path = generator_path(args.checkpoint_path, cfg)
    if not path:
        raise ValueError(f"{args.config_path} names no runtime.checkpoint: give --checkpoint_path")
    model = load_adapters(load_generator(path, cfg, args.use_ema)[0], adapter_specs(args.lora, args.merge_lora),
                          args.merge_lora).to(device, cfg.torch_dtype(device)).eval()
    description = f"{shown(args.config_path)}, {shown(path)}, {device}"
    return Engine(cfg, model, build_codec(cfg, device), build_text_encoder(cfg, device), device, description)


def shown(path: str) -> str:
    """A path as the page shows it: from the repository root when inside it."""
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return path


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        limits = Limits(args.max_streams, args.max_seconds, args.idle_timeout, args.max_prompt_chars, args.ahead_blocks)
        engine = build_engine(args)
    except (ConfigError, ValueError, OSError, NotImplementedError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"HiAR live demo: {engine.description}; open http://{args.host}:{args.port}", flush=True)
    uvicorn.run(create_app(engine, limits), host=args.host, port=args.port, log_level="warning",
                ws_max_size=2**20)  # prompts are short: a bigger message is refused by closing its connection
    return 0


if __name__ == "__main__":
    sys.exit(main())
