"""Data on disk the way the field keeps it: webdataset shards of samples, and prompt lists.

A toy sample in a shard is one key with `frames.npy` (uint8 [F, H, W, 3]), `caption.txt` and
`params.json` (the clip's ground truth). Prompts come from a text file (one a line) or from any
local file the `datasets` library reads (json, jsonl, csv, parquet) with a `prompt`, `caption` or
`text` column; any other suffix is refused. Toy captions are in the style `train.captions` names
(`toy_caption`).
"""

from __future__ import annotations

import io
import json
import os
import unicodedata
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from hiar.captions import phrase
from hiar.config import TrainConfig, choices
from hiar.toyworld import ToyClip, sample_clip

# The caption styles training may use: never "held_out", whose phrasings evaluation keeps unseen.
TRAINING_CAPTIONS = choices(TrainConfig, "captions")


def check_training_captions(style: str) -> None:
    if style not in TRAINING_CAPTIONS:
        raise ValueError(f"training caption style {style!r}: expected one of {TRAINING_CAPTIONS} "
                         "(held-out phrasings are for evaluation only)")


def toy_caption(clip: ToyClip, seed: int, index: int, style: str = "template") -> str:
    """The training caption of clip `index` of the world with `seed` in `style` (train.captions): the
    template, or a varied phrasing keyed by (seed, index), the same words in every run and on every rank."""
    check_training_captions(style)
    return phrase(clip.spec(), style, f"{seed}/{index}")


def toy_samples(seed: int, num_frames: int, height: int, width: int, start: int = 0,
                count: int | None = None, captions: str = "template") -> Iterator[dict]:
    """Clips start, start + 1, ... of the toy world, rendered and captioned in style `captions`: the
    stream train/ programs read."""
    index = start
    while count is None or index < start + count:
        clip = sample_clip(seed, index, height, width)
        yield {"__key__": f"{index:08d}", "frames": clip.render(num_frames),
               "caption": toy_caption(clip, seed, index, captions), "params": clip.params()}
        index += 1


def write_shards(samples: Iterable[dict], folder: str | os.PathLike, per_shard: int = 256) -> list[Path]:
    """Write samples as webdataset shards folder/shard-000000.tar, ...; returns the shard paths."""
    import webdataset as wds

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with wds.ShardWriter(str(folder / "shard-%06d.tar"), maxcount=per_shard, verbose=0) as sink:
        for s in samples:
            buf = io.BytesIO()
            np.save(buf, s["frames"])
            sink.write({"__key__": s["__key__"], "frames.npy": buf.getvalue(), "caption.txt": s["caption"],
                        "params.json": json.dumps(s["params"])})
    return sorted(folder.glob("shard-*.tar"))


def read_shards(paths: Iterable[str | os.PathLike]) -> Iterator[dict]:
    """Samples back from shards, decoded: frames uint8 array, caption str, params dict."""
    import webdataset as wds

    for raw in wds.WebDataset([str(p) for p in paths], shardshuffle=False):
        yield {"__key__": raw["__key__"], "frames": np.load(io.BytesIO(raw["frames.npy"])),
               "caption": raw["caption.txt"].decode(), "params": json.loads(raw["params.json"])}


def toy_clip_of(sample: dict) -> ToyClip:
    return ToyClip.from_params(sample["params"])


# Prompt files by suffix: None is text, one prompt a line; the rest are `datasets` builders, always
# local (an unknown suffix is refused: `datasets.load_dataset` would look for a hub data set of that name).
PROMPT_FORMATS = {".txt": None, ".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def load_prompts(path: str | os.PathLike) -> list[str]:
    """Prompts from a .txt file (one a line) or a dataset file with a prompt/caption/text column."""
    path = Path(path)
    if path.suffix.lower() not in PROMPT_FORMATS:
        raise ValueError(f"prompt file {path} has an unknown type {path.suffix or '(no suffix)'!r}: use one of "
                         f"{', '.join(PROMPT_FORMATS)}")
    kind = PROMPT_FORMATS[path.suffix.lower()]
    if kind is None:
        return prompt_lines(path)
    import datasets

    check_regular_file(path, "prompt file")
    table = datasets.load_dataset(kind, data_files=str(path), split="train")
    column = next((c for c in ("prompt", "caption", "text") if c in table.column_names), None)
    if column is None:
        raise ValueError(f"{path}: no prompt, caption or text column (columns: {table.column_names})")
    prompts = [str(p).strip() for p in table[column]]
    for i, prompt in enumerate(prompts):
        check_prompt(prompt, f"{path} row {i + 1}")
    return nonempty([p for p in prompts if p], path)


def prompt_lines(path: str | os.PathLike) -> list[str]:
    """The prompts of a UTF-8 text file, one a line (blank lines skipped); ValueError naming the file
    and line when it is not text."""
    path = Path(path)
    check_regular_file(path, "prompt file")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ValueError(f"prompt file {path} is not UTF-8 text (byte {err.start} is {err.object[err.start]:#x}): "
                         "give a text file, one prompt a line") from None
    prompts = [line.strip() for line in text.splitlines()]
    for i, prompt in enumerate(prompts):
        check_prompt(prompt, f"prompt file {path} line {i + 1}")
    return nonempty([p for p in prompts if p], path)


def check_prompt(prompt: str, where: str) -> None:
    """Refuse control characters (NUL bytes of a binary file, escape sequences): a prompt is plain text."""
    bad = next((c for c in prompt if unicodedata.category(c) == "Cc" and c != "\t"), None)
    if bad is not None:
        raise ValueError(f"{where} holds the control character {bad!r}; prompts are plain text: is it a binary file?")


def check_regular_file(path: Path, what: str) -> None:
    """FileNotFoundError when `path` is missing; ValueError when it is a folder, FIFO or device (reading
    a FIFO would wait forever)."""
    if not path.exists():
        raise FileNotFoundError(f"{what} {path} does not exist")
    if not path.is_file():
        kind = "a folder" if path.is_dir() else "not a regular file"
        raise ValueError(f"{what} {path} is {kind}; give the file itself")


def nonempty(prompts: list[str], path: Path) -> list[str]:
    if not prompts:
        raise ValueError(f"{path} holds no prompts")
    return prompts


class PromptSource:
    """Prompt i of a stream: "toyworld" (captions of the world's clips from `seed`, in style `captions`),
    a prompt file (`load_prompts`, cycled; training reads it in a shuffled order, `hiar.order`) or a list
    of prompts. Relative file paths are taken from `root` (the repository)."""

    def __init__(self, source: str | list[str], seed: int, height: int, width: int, root: str | os.PathLike = ".",
                 captions: str = "template"):
        check_training_captions(captions)  # before the first prompt is read
        self.seed, self.height, self.width, self.captions = seed, height, width, captions
        if isinstance(source, list):  # prompts given directly
            self.prompts = source
        else:
            path = Path(source)
            self.prompts = None if source == "toyworld" else load_prompts(path if path.is_absolute() else Path(root) / path)

    @property
    def size(self) -> int | None:
        """How many prompts the file holds; None for the toy world's endless captions."""
        return None if self.prompts is None else len(self.prompts)

    def __getitem__(self, i: int) -> str:
        if self.prompts is None:
            return toy_caption(sample_clip(self.seed, i, self.height, self.width), self.seed, i, self.captions)
        return self.prompts[i % len(self.prompts)]
