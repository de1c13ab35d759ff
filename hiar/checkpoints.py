"""Model checkpoints that describe themselves: safetensors with the resolved config embedded.

`save_model` writes weights plus the resolved config (YAML in the safetensors metadata) atomically;
`load_model` needs only the file. Any mismatch stops with one paragraph naming the file, the
architecture it expects and the first offending keys; nothing is loaded half-way.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from hiar.atomic import atomic_path
from hiar.config import Config, ConfigError, config_from_dict, config_to_dict
from hiar.models import WanModel


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded as asked; the message says why and what to do."""


def save_model(model: WanModel, cfg: Config, path: str | os.PathLike, extra: dict[str, str] | None = None) -> Path:
    metadata = {"hiar_config": yaml.safe_dump(config_to_dict(cfg), sort_keys=False), **(extra or {})}
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return Path(path)


def checkpoint_config(path: str | os.PathLike) -> Config:
    """The resolved config stored in one of our checkpoints."""
    try:
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{path}: not a readable safetensors file ({err}); is it truncated or of "
                              "another format?") from None
    if "hiar_config" not in metadata:
        raise CheckpointError(f"{path}: a safetensors file without an embedded HiAR config; it was not written "
                              "by hiar.checkpoints.save_model")
    try:
        return config_from_dict(yaml.safe_load(metadata["hiar_config"]))
    except ConfigError as err:
        raise CheckpointError(f"{path}: its embedded config is invalid: {err}") from None


def describe(model: WanModel) -> str:
    c = model.config
    return f"Wan DiT ({c.num_layers} layers, {c.num_heads} heads x {c.head_dim}, ffn {c.ffn_dim}, text {c.text_dim})"


def load_weights(model: WanModel, state: dict[str, torch.Tensor], source: str) -> WanModel:
    """`load_state_dict` that checks everything first and explains a mismatch in one paragraph."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
             if k in state and state[k].shape != v.shape]
    if missing or unexpected or wrong:
        parts = [f"{name} ({len(keys)}): {', '.join(keys[:4])}" for name, keys in
                 (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes (file vs model)", wrong))
                 if keys]
        raise CheckpointError(f"{source} does not match the expected {describe(model)}: " + "; ".join(parts)
                              + ". Check that the config matches the checkpoint (e.g. --config_path).")
    model.load_state_dict(state, strict=True)
    return model


def load_model(path: str | os.PathLike, cfg: Config | None = None) -> tuple[WanModel, Config]:
    """Our checkpoint -> (model, its config). With `cfg`, the stored architecture must equal cfg.model."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.suffix != ".safetensors":
        raise CheckpointError(f"{path}: only HiAR safetensors checkpoints load today; HiAR/Self-Forcing .pt files "
                              "and Wan2.1 folders need the converter that is not built yet")
    stored = checkpoint_config(path)
    if cfg is not None and dataclasses.replace(cfg.model, attention_backend=stored.model.attention_backend) != stored.model:
        diff = [f"model.{k}: {v} in file, {getattr(cfg.model, k)} in config"
                for k, v in vars(stored.model).items() if getattr(cfg.model, k) != v]
        raise CheckpointError(f"{path} holds another architecture than the config asks for: {'; '.join(diff[:4])}")
    model = WanModel(stored.model)
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{path}: could not read its tensors ({err}); the file may be truncated") from None
    return load_weights(model, state, str(path)), stored
