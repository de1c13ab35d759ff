"""Run folders of the training programs: what a fresh run, a resume and a checkpoint may do to them.

A run folder (train.output_dir) holds checkpoints/step-N/ (each written under a temporary name and
renamed, so a folder of that name is complete when written), checkpoints/latest (the newest one's
name) and, at the end, model.safetensors. The rules:
* a fresh run refuses a folder that holds another run's checkpoints (continue it with --resume, or
  choose another train.output_dir); nothing of an earlier run is replaced behind the user's back;
* --resume loads the checkpoint `latest` names and, if that one is unreadable, the next newest intact
  one, saying so; unreadable ones are set aside as corrupt-step-N (kept, never loaded again), and the
  temporaries of an interrupted save are removed;
* pruning keeps the two newest checkpoints and never the one `latest` names;
* nothing a resume reads is unpickled beyond plain data: DeepSpeed's own files are read with torch's
  weights-only loader, allowing the three DeepSpeed types its optimizer states hold.
"""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import torch

from hiar.config import ConfigError

CHECKPOINT_GLOB = "step-*"


class UnreadableCheckpointError(RuntimeError):
    """A checkpoint file that cannot be read as the plain data a checkpoint holds (truncated, or
    holding objects that would run code when unpickled); the message names the file."""


def check_fresh(out: Path) -> None:
    """Refuse a fresh run in a folder that holds another run's checkpoints."""
    root = out / "checkpoints"
    if (root / "latest").exists() or any(root.glob(CHECKPOINT_GLOB)):
        raise ConfigError(f"train.output_dir={out} holds the checkpoints of an earlier run: continue it with "
                          "--resume, or choose another train.output_dir (or delete that folder)")


def candidates(root: Path) -> list[Path]:
    """Checkpoint folders to resume from, in order: the one `latest` names, then the others newest first."""
    folders = sorted(root.glob(CHECKPOINT_GLOB), reverse=True)
    latest = root / "latest"
    if latest.is_file():
        named = root / latest.read_text().strip()
        folders = [named] + [f for f in folders if f != named]
    return folders


def set_aside(folder: Path) -> Path:
    """Keep an unreadable checkpoint out of the way (and out of `candidates`) without deleting it."""
    target = folder.with_name(f"corrupt-{folder.name}")
    if folder.exists():
        folder.rename(target)
    return target


def clean_partials(root: Path) -> list[Path]:
    """Remove the temporaries of saves that were interrupted (a kill, a full disk)."""
    partials = sorted(root.glob(".step-*.tmp"))
    for partial in partials:
        shutil.rmtree(partial, ignore_errors=True)
    return partials


def prune(root: Path, keep: int = 2) -> None:
    """Delete all but the `keep` newest checkpoints (0: none), never the one `latest` names."""
    latest = root / "latest"
    named = root / latest.read_text().strip() if latest.is_file() else None
    for old in (sorted(root.glob(CHECKPOINT_GLOB))[:-keep] if keep else []):
        if old != named:
            shutil.rmtree(old, ignore_errors=True)


def deepspeed_safe_globals() -> list:
    """The non-tensor types DeepSpeed 0.19 writes into its optimizer states: a loss scaler, an enum,
    a named tuple. Weights-only unpickling builds these from their recorded fields without running code."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def load_weights_only(path: str | Path, map_location=None, mmap: bool = False):
    """torch.load with weights-only semantics (plain data, tensors and the allowed DeepSpeed types);
    anything else, or a damaged file, is an `UnreadableCheckpointError` naming the file."""
    try:
        with torch.serialization.safe_globals(deepspeed_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        raise UnreadableCheckpointError(f"{path}: refused to unpickle it: {str(err).splitlines()[0][:300]}. A "
                                        "checkpoint written by this program holds only tensors and plain data; "
                                        "this file was replaced or damaged") from None
    except (RuntimeError, EOFError, OSError) as err:  # torch raises these for truncated or foreign files
        raise UnreadableCheckpointError(f"{path}: unreadable ({type(err).__name__}: "
                                        f"{str(err).splitlines()[0][:200]})") from None


def weights_only(engine) -> None:
    """Make a DeepSpeed engine read its checkpoint files with `load_weights_only` (its own
    TorchCheckpointEngine calls torch.load with weights_only=False, which runs any pickled code)."""
    engine.checkpoint_engine.load = load_weights_only
