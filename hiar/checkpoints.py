"""Loading and saving the Wan DiT in every layout users arrive with.

`load_generator(path, cfg, use_ema)` takes any of:
* our checkpoints: safetensors with the resolved config embedded (`save_model`), needing only the file;
* HiAR / Self-Forcing training checkpoints: a `.pt` dict with `generator` (and optionally
  `generator_ema`, `critic`) whose keys may carry `model.`, `_fsdp_wrapped_module.`,
  `_checkpoint_wrapped_module.`, `_orig_mod.` prefixes and use Wan's original parameter names;
* an original Wan2.1 folder (`config.json` + `diffusion_pytorch_model*.safetensors`, e.g.
  wan_models/Wan2.1-T2V-1.3B), whose names diffusers' own `convert_wan_transformer_to_diffusers` maps;
* a diffusers folder (Wan-AI/Wan2.1-T2V-1.3B-Diffusers, or its `transformer/` sub-folder);
* a run's training checkpoint folder, `checkpoints/step-N/` (hiar.training): train/distill.py's model.pt
  in it, or a one-model run's (train/teacher.py, train/ode_init.py) DeepSpeed weights, or with `use_ema`
  the EMA its extra.pt carries, with the run's config.yaml: a run is measured at any step it kept.
A model with LoRA adapters (hiar/lora.py) is saved merged, a plain model; `save_adapter` writes the
adapter alone, with the run's config and the architecture it adapts, and `load_adapter` reads it back,
refusing an adapter made for another architecture.
Any mismatch (architecture, missing or unexpected keys, shapes, unreadable file) stops with one
paragraph naming the file, the expected architecture and the first offending keys; nothing is
loaded half-way.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from pathlib import Path

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from hiar import lora
from hiar.atomic import atomic_path
from hiar.config import (Config, ConfigError, LoraConfig, ModelConfig, config_from_dict, config_to_dict, load_config,
                         repo_path)
from hiar.models import WanModel
from hiar.runs import UnreadableCheckpointError, load_weights_only


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded as asked; the message says why and what to do."""


def save_model(model: WanModel, cfg: Config, path: str | os.PathLike, extra: dict[str, str] | None = None) -> Path:
    metadata = {"hiar_config": yaml.safe_dump(config_to_dict(cfg), sort_keys=False), **(extra or {})}
    tensors = {k: v.detach().contiguous().cpu() for k, v in lora.merged_state(model).items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return Path(path)


def checkpoint_config(path: str | os.PathLike) -> Config:
    """The resolved config stored in one of our checkpoints: a model.safetensors, a training checkpoint's
    model.pt (train/distill.py stores its config beside the weights), or a run's checkpoints/step-N/ folder."""
    if is_step_folder(Path(path)):
        try:
            return load_config(Path(path) / "config.yaml")
        except ConfigError as err:
            raise CheckpointError(f"{path}: its config.yaml is invalid: {err}") from None
    if Path(path).suffix in (".pt", ".pth"):
        return _training_checkpoint_config(Path(path))
    try:
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{path}: not a readable safetensors file ({err}); is it truncated or of "
                              "another format?") from None
    if "hiar_adapter" in metadata:
        raise CheckpointError(f"{path} is a LoRA adapter, not a model: give the model it adapts as the checkpoint "
                              f"and the adapter with --lora {path}")
    if "hiar_config" not in metadata:
        raise CheckpointError(f"{path}: a safetensors file without an embedded HiAR config; it was not written "
                              "by hiar.checkpoints.save_model")
    try:
        return config_from_dict(yaml.safe_load(metadata["hiar_config"]))
    except ConfigError as err:
        raise CheckpointError(f"{path}: its embedded config is invalid: {err}") from None


def is_step_folder(path: Path) -> bool:
    """A run's training checkpoint, checkpoints/step-N/ (hiar.training.Trainer.save writes config.yaml in it)."""
    return path.is_dir() and (path / "config.yaml").is_file()


def _training_checkpoint_config(path: Path) -> Config:
    # memory-mapped: only the config is read, not the generator, EMA and critic (15 GB for a 1.3B run), which
    # load_generator reads afterwards
    stored = _read_training_checkpoint(path, use_ema=False, mmap=True)[1]
    if stored is None:
        raise CheckpointError(f"{path}: a state dict without the config train/distill.py stores in model.pt")
    return _stored_config(path, stored)


def _stored_config(path: Path, stored: dict) -> Config:
    try:
        return config_from_dict(stored)
    except ConfigError as err:
        raise CheckpointError(f"{path}: its stored config is invalid: {err}") from None


def describe(model: WanModel) -> str:
    return describe_config(model.config)


def describe_config(c: ModelConfig) -> str:
    return f"Wan DiT ({c.num_layers} layers, {c.num_heads} heads x {c.head_dim}, ffn {c.ffn_dim}, text {c.text_dim})"


def empty_model(cfg: ModelConfig) -> WanModel:
    """A WanModel without storage (meta tensors), for `load_weights` to fill: no random initialisation
    (minutes for 14B parameters) and no float32 copy before the weights arrive."""
    with torch.device("meta"):
        return WanModel(cfg)


def load_weights(model: WanModel, state: dict[str, torch.Tensor], source: str,
                 dtype: torch.dtype = torch.float32) -> WanModel:
    """`load_state_dict` that checks everything first and explains a mismatch in one paragraph; the
    weights are taken as `dtype` (assigned, so `model` may be an `empty_model`)."""
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
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)
    return model


def _load_own(path: Path, cfg: Config | None, dtype: torch.dtype) -> tuple[WanModel, Config]:
    """Our checkpoint -> (model, config): its stored config, or `cfg` (whose model section must equal the
    stored architecture) with the caller's sampling / inference settings intact."""
    stored = checkpoint_config(path)
    _check_same_architecture(path, stored, cfg)
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{path}: could not read its tensors ({err}); the file may be truncated") from None
    return load_weights(empty_model(stored.model), state, str(path), dtype), stored if cfg is None else cfg


def _check_same_architecture(path: Path, stored: Config, cfg: Config | None) -> None:
    """A given `cfg` must describe the stored model (the attention backend is a choice of the run, not of the file)."""
    if cfg is None:
        return
    if dataclasses.replace(cfg.model, attention_backend=stored.model.attention_backend) != stored.model:
        diff = [f"model.{k}: {v} in file, {getattr(cfg.model, k)} in config"
                for k, v in vars(stored.model).items() if getattr(cfg.model, k) != v]
        raise CheckpointError(f"{path} holds another architecture than the config asks for: {'; '.join(diff[:4])}")


def _read_step_folder(folder: Path, use_ema: bool) -> tuple[dict[str, torch.Tensor], Config]:
    """A one-model run's checkpoint folder (hiar.training.Trainer.save; train/teacher.py, train/ode_init.py):
    the weights in its DeepSpeed folder `model/`, or with `use_ema` the EMA extra.pt carries, and the run's
    config.yaml. Read with weights-only unpickling, as a resume reads them (hiar.runs)."""
    cfg = checkpoint_config(folder)
    try:
        if use_ema:
            extra = load_weights_only(folder / "extra.pt") if (folder / "extra.pt").is_file() else {}
            shadow = extra.get("ema", {}).get("shadow")
            if shadow is not None:
                return shadow, cfg
            warnings.warn(f"{folder} has no EMA weights (extra.pt); --use_ema falls back to the model's own",
                          stacklevel=3)
        states = folder / "model" / "mp_rank_00_model_states.pt"
        if not states.is_file():
            raise CheckpointError(f"{folder}: a training checkpoint without model.pt (train/distill.py's) or "
                                  "model/mp_rank_00_model_states.pt (a one-model run's DeepSpeed weights)")
        # memory-mapped: under ZeRO-0 the file holds the optimizer's states too, never read here
        blob = load_weights_only(states, map_location="cpu", mmap=True)
    except UnreadableCheckpointError as err:
        raise CheckpointError(str(err)) from None
    if blob.get("ds_config", {}).get("zero_optimization", {}).get("stage", 0) == 3:
        raise CheckpointError(f"{states}: ZeRO-3 partitioned the weights across ranks, so this file holds none of "
                              "them; load the run's model.safetensors, or gather the step's weights with the "
                              "zero_to_fp32.py DeepSpeed writes beside its checkpoints")
    return blob["module"], cfg


# -- LoRA adapters ----------------------------------------------------------------------------------


def save_adapter(model: WanModel, cfg: Config, path: str | os.PathLike) -> Path:
    """The adapter of an adapted model (`hiar.lora`, its training adapter) as safetensors: A and B of every
    adapted layer, with the run's config (its `lora` section says rank, alpha and targets) and the
    architecture the adapter belongs to (`model`, what `load_adapter` checks)."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in lora.adapter_state(model).items()}
    metadata = {"hiar_adapter": yaml.safe_dump(config_to_dict(cfg), sort_keys=False),
                "hiar_base_model": yaml.safe_dump(dataclasses.asdict(model.config), sort_keys=False),
                "hiar_base_description": describe(model)}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return Path(path)


@dataclasses.dataclass(frozen=True)
class Adapter:
    """An adapter file: its LoRA settings, the architecture it adapts, its tensors."""

    path: Path
    lora: LoraConfig
    base: ModelConfig
    state: dict[str, torch.Tensor]

    def check_fits(self, model_cfg: ModelConfig) -> None:
        """Refuse a model of another architecture than the adapter's, naming both."""
        same = dataclasses.replace(model_cfg, attention_backend=self.base.attention_backend) == self.base
        if not same:
            diff = [f"{k} {v} (adapter) vs {getattr(model_cfg, k)} (model)" for k, v in vars(self.base).items()
                    if getattr(model_cfg, k) != v and k != "attention_backend"]
            raise CheckpointError(f"{self.path} is an adapter for a {describe_config(self.base)}, but the model is a "
                                  f"{describe_config(model_cfg)} ({'; '.join(diff[:4])}): give the checkpoint it "
                                  "was trained on (or the config of that architecture)")


def read_adapter(path: str | os.PathLike, tensors: bool = True) -> Adapter:
    """An adapter file written by `save_adapter`; `tensors=False` reads only its header (cheap: a program
    checks its inputs before any compute)."""
    path = Path(path)
    check_checkpoint_path(path)
    try:
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()} if tensors else {}
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{path}: not a readable safetensors file ({err}); is it truncated?") from None
    if "hiar_adapter" not in metadata:
        raise CheckpointError(f"{path} is not a LoRA adapter written by a HiAR run (hiar.checkpoints.save_adapter)")
    try:
        cfg = config_from_dict(yaml.safe_load(metadata["hiar_adapter"]))
        base = ModelConfig(**{k: tuple(v) if isinstance(v, list) else v
                              for k, v in yaml.safe_load(metadata["hiar_base_model"]).items()})
    except (ConfigError, TypeError, yaml.YAMLError) as err:
        raise CheckpointError(f"{path}: its embedded config is invalid: {err}") from None
    return Adapter(path, cfg.lora, base, state)


def adapter_specs(specs: list[str] | None, merge: bool = False) -> list[tuple[str, float]]:
    """Command-line `PATH[:SCALE]` specs (--lora) as (path, scale); a tail after the last ':' that is no
    number belongs to the path. `merge` with no adapter is an error: there is nothing to merge."""
    if merge and not specs:
        raise ValueError("--merge_lora merges the --lora adapters: give at least one --lora PATH[:SCALE]")
    adapters = []
    for spec in specs or []:
        path, sep, tail = spec.rpartition(":")
        try:
            adapters.append((path, float(tail)) if sep else (spec, 1.0))
        except ValueError:
            adapters.append((spec, 1.0))
    return adapters


def load_adapters(model: WanModel, adapters: list[tuple[str | os.PathLike, float]], merge: bool = False) -> WanModel:
    """`model` with the adapter files `adapters` ((path, scale) each) applied, all active, and with
    `merge` folded into its weights (`hiar.lora.merge`). Every file is checked before any is applied."""
    if not adapters:
        return model
    read = [(read_adapter(path), scale) for path, scale in adapters]
    for adapter, _ in read:
        adapter.check_fits(model.config)
    lora.attach(model, [(lora.peft_config(a.lora), a.state, scale) for a, scale in read])
    return lora.merge(model) if merge else model


# -- foreign layouts -------------------------------------------------------------------------------

WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def clean_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip training-wrapper prefixes (FSDP, activation checkpointing, torch.compile) and the
    `model.` of Self-Forcing's wrapper module."""
    out = {}
    for key, value in state.items():
        for prefix in WRAPPER_PREFIXES:
            key = key.replace(prefix, "")
        out[key.removeprefix("model.")] = value
    return out


def to_diffusers_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Wan's original parameter names -> diffusers' (ours), with diffusers' own converter."""
    if not any(".self_attn." in k or k.startswith("head.") for k in state):
        return state  # already diffusers names
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    return convert_wan_transformer_to_diffusers(dict(state))


def architecture_from_json(data: dict) -> dict[str, int | float]:
    """ModelConfig fields described by a Wan (`dim`, `num_heads`, ...) or diffusers config.json."""
    if "attention_head_dim" in data:  # diffusers WanTransformer3DModel
        return dict(num_layers=data["num_layers"], num_heads=data["num_attention_heads"],
                    head_dim=data["attention_head_dim"], ffn_dim=data["ffn_dim"], in_channels=data["in_channels"],
                    out_channels=data["out_channels"], text_dim=data["text_dim"], freq_dim=data["freq_dim"])
    return dict(num_layers=data["num_layers"], num_heads=data["num_heads"], head_dim=data["dim"] // data["num_heads"],
                ffn_dim=data["ffn_dim"], in_channels=data["in_dim"], out_channels=data["out_dim"],
                freq_dim=data["freq_dim"], text_len=data.get("text_len", 512))


def _check_architecture(source: Path, described: dict, cfg: Config) -> None:
    wrong = [f"{k}={v} in {source.name}, {getattr(cfg.model, k)} in the config" for k, v in described.items()
             if getattr(cfg.model, k) != v]
    if wrong:
        raise CheckpointError(f"{source} describes another model than the config: {'; '.join(wrong[:4])}. "
                              "Choose the matching config (e.g. --config_path configs/hiar.yaml for Wan2.1-1.3B).")


def _read_folder(folder: Path, cfg: Config, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A Wan or diffusers transformer folder: check config.json, read every weight shard as `dtype`
    (shard by shard, so a 14B model read in bfloat16 never holds its float32 files whole)."""
    if (folder / "transformer").is_dir():
        folder = folder / "transformer"
    config_json = folder / "config.json"
    shards = sorted(folder.glob("diffusion_pytorch_model*.safetensors"))
    if not config_json.is_file() or not shards:
        raise CheckpointError(f"{folder}: expected config.json and diffusion_pytorch_model*.safetensors (a Wan2.1 "
                              "or diffusers model folder); found " + (", ".join(p.name for p in folder.iterdir())
                                                                       or "nothing"))
    try:
        described = architecture_from_json(json.loads(config_json.read_text()))
    except (json.JSONDecodeError, KeyError) as err:
        raise CheckpointError(f"{config_json}: not a Wan or diffusers transformer config ({err})") from None
    _check_architecture(config_json, described, cfg)
    state: dict[str, torch.Tensor] = {}
    for shard in shards:
        try:
            state.update({k: v.to(dtype) for k, v in load_file(str(shard)).items()})
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"{shard}: could not read its tensors ({err}); the file may be truncated") from None
    return state


def _read_training_checkpoint(path: Path, use_ema: bool,
                              mmap: bool = False) -> tuple[dict[str, torch.Tensor], dict | None]:
    """(state dict, the config train/distill.py stores beside it, or None); `mmap`: tensors read on use."""
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:  # torch raises many types for corrupt or foreign files
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(err).__name__}: "
                              f"{str(err).splitlines()[0][:200]}); is it truncated?") from None
    if not isinstance(blob, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors or a training checkpoint, got {type(blob).__name__}")
    if "generator" not in blob:
        return blob, None  # a bare state dict
    key = "generator"
    if use_ema:
        if "generator_ema" in blob:
            key = "generator_ema"
        else:
            warnings.warn(f"{path} has no 'generator_ema' weights; --use_ema falls back to 'generator'",
                          stacklevel=3)
    return blob[key], blob.get("config")


FILE_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")


def generator_path(given: str | None, cfg: Config) -> str | None:
    """The student's weights a program loads: `given` (its --checkpoint_path), else the config's
    runtime.checkpoint (from the repository), else None (random weights)."""
    return given or (cfg.runtime.checkpoint and str(repo_path(cfg.runtime.checkpoint))) or None


def check_checkpoint_path(path: str | os.PathLike) -> None:
    """A checkpoint is a regular file or a model folder (cheap: programs call it before any compute).
    Reading a FIFO or a device would wait forever; a folder named like a file is a mistake, not a Wan or
    diffusers layout."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.is_dir() and path.suffix in FILE_SUFFIXES:
        raise CheckpointError(f"checkpoint {path} is a folder named like a {path.suffix} file: give the checkpoint "
                              "file itself (or a Wan2.1 / diffusers model folder)")
    if not (path.is_file() or path.is_dir()):
        raise CheckpointError(f"checkpoint {path} is not a regular file (a FIFO, socket or device: neither a "
                              "regular file nor a folder): give the checkpoint file")


def load_generator(path: str | os.PathLike, cfg: Config | None = None, use_ema: bool = False,
                   dtype: torch.dtype = torch.float32) -> tuple[WanModel, Config]:
    """The student from any supported layout (module docstring) -> (model on the CPU in `dtype`, config).

    Our checkpoints carry their config, returned when `cfg` is None; every other layout is built from
    `cfg` and checked against it.
    """
    path = Path(path)
    check_checkpoint_path(path)
    if is_step_folder(path):
        if (path / "model.pt").is_file():
            path = path / "model.pt"  # train/distill.py's: the generator, its EMA and the config
        else:
            state, stored = _read_step_folder(path, use_ema)
            _check_same_architecture(path, stored, cfg)
            return load_weights(empty_model(stored.model), clean_keys(state), str(path), dtype), cfg or stored
    if path.is_file() and path.suffix == ".safetensors":
        if use_ema:
            warnings.warn(f"{path} holds one set of weights; --use_ema has nothing to choose", stacklevel=2)
        return _load_own(path, cfg, dtype)
    if path.is_file() and path.suffix in (".pt", ".pth", ".bin"):
        state, stored = _read_training_checkpoint(path, use_ema)
        if cfg is None and stored is not None:  # ours (train/distill.py) carry their config
            cfg = _stored_config(path, stored)
    if cfg is None:
        raise CheckpointError(f"{path}: this layout carries no HiAR config; pass one (e.g. configs/hiar.yaml)")
    if path.is_dir():
        state = _read_folder(path, cfg, dtype)
    elif path.suffix not in (".pt", ".pth", ".bin"):
        raise CheckpointError(f"{path}: unknown checkpoint type; expected .safetensors (HiAR), .pt (HiAR / "
                              "Self-Forcing training checkpoint) or a Wan2.1 / diffusers model folder")
    return load_weights(empty_model(cfg.model), to_diffusers_names(clean_keys(state)), str(path), dtype), cfg
