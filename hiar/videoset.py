"""A folder of videos to evaluate, from any system: one mp4 a prompt (and sample), grouped by method.

Layouts accepted (checked before any compute):

    videos/*.mp4                    one method, named after the folder
    videos/<method>/*.mp4           one method a subfolder

A video's prompt comes from, in order: `prompts.json` beside it ({"file name.mp4": "prompt"}, VBench's
--prompt_file format, written by eval/rollout.py and inference.py), the latents file inference.py writes with
--save_latents (`<stem>.latents.safetensors`, metadata "prompt"), or the file name as inference.py and
VBench write it ("<prompt>-<sample>.mp4").

File names follow VBench's convention exactly (its README and vbench/__init__.py, build_full_info_json:
f"{prompt}-{index}.mp4"): the prompt verbatim, no truncation. Only what a POSIX file system forbids in a
name is mapped: "/" -> "∕" (DIVISION SLASH) and NUL -> "␀" (SYMBOL FOR NULL). A name whose
longest derived file (`<stem> (9999).latents.safetensors.partial`) would pass the 255-byte limit of a
file name keeps the prompt's first bytes (whole characters), then "~" and 12 hex digits of the prompt's
SHA-256: such a prompt is found only through `prompts.json`, which inference.py writes beside the videos
(`record_prompts`). None of VBench's 946 standard prompts needs either rule (tests/test_vbench.py).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from hiar.atomic import atomic_path

PROMPTS_FILE = "prompts.json"
NAME_MAX = 255  # bytes in one file name (ext4, xfs, btrfs, tmpfs)
# what the writers add to a stem: ' (9999)' (hiar.video.claim_free), '.latents.safetensors' + '.partial'
STEM_MAX = NAME_MAX - len(" (9999).latents.safetensors.partial")
FORBIDDEN = {"/": "\u2215", "\0": "\u2400"}  # the only characters a POSIX file name cannot hold


def video_stem(prompt: str, sample: int) -> str:
    """VBench's name for sample `sample` of `prompt`, without '.mp4' (module docstring)."""
    stem = "".join(FORBIDDEN.get(c, c) for c in prompt) + f"-{sample}"
    if len(stem.encode()) <= STEM_MAX:
        return stem
    tail = f"~{hashlib.sha256(prompt.encode()).hexdigest()[:12]}-{sample}"
    head = stem.encode()[:STEM_MAX - len(tail)].decode(errors="ignore")  # cut at a character boundary
    return head + tail


def prompt_from_stem(stem: str) -> str:
    """The inverse of video_stem for every name it leaves whole: the trailing -<sample> dropped, the
    mapped characters restored. A shortened name (~<hash>) has no inverse: read prompts.json."""
    prompt = re.sub(r"-\d+$", "", stem)
    for c, mapped in FORBIDDEN.items():
        prompt = prompt.replace(mapped, c)
    return prompt


def record_prompts(folder: str | os.PathLike, prompts: dict[str, str]) -> Path:
    """Add {file name: prompt} to folder/prompts.json (VBench's --prompt_file format), replacing the
    entries of those names. Concurrent writers (torchrun ranks, several runs) take turns under a lock
    on the folder; the file is replaced atomically, so a reader sees the old or the new listing."""
    folder = Path(folder)
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with contextlib.suppress(OSError):  # no locks on this file system: last writer wins
            fcntl.flock(fd, fcntl.LOCK_EX)
        path = folder / PROMPTS_FILE
        listed = {}
        if path.is_file():
            try:
                listed = json.loads(path.read_text())
            except json.JSONDecodeError:
                listed = None
            if not isinstance(listed, dict):
                raise OSError(f"{path} is not a {{file name: prompt}} JSON object: fix or remove it, then run again")
        listed.update(prompts)
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(listed, indent=1))
        return path
    finally:
        os.close(fd)  # unlocks


@dataclass(frozen=True)
class VideoItem:
    method: str
    path: Path
    prompt: str

    @property
    def name(self) -> str:
        return self.path.stem


def prompt_from_filename(path: Path) -> str:
    """'a red circle moving left-0.mp4' -> 'a red circle moving left' (prompt_from_stem)."""
    return prompt_from_stem(path.stem)


def _prompt(path: Path, listed: dict[str, str]) -> str:
    if path.name in listed:
        return listed[path.name]
    latents = path.with_suffix(".latents.safetensors")
    if latents.is_file():
        from safetensors import safe_open

        with safe_open(str(latents), "pt") as f:
            prompt = (f.metadata() or {}).get("prompt")
        if prompt:
            return prompt
    return prompt_from_filename(path)


def method_videos(folder: Path, method: str) -> list[VideoItem]:
    listed_path = folder / PROMPTS_FILE
    listed = json.loads(listed_path.read_text()) if listed_path.is_file() else {}
    return [VideoItem(method, p, _prompt(p, listed)) for p in sorted(folder.glob("*.mp4"))]


def find_videos(folder: str | Path) -> dict[str, list[VideoItem]]:
    """{method: videos} of a folder in either layout; ValueError naming the problem otherwise."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"video folder {folder} does not exist")
    if any(folder.glob("*.mp4")):
        return {folder.resolve().name: method_videos(folder, folder.resolve().name)}
    methods = {d.name: method_videos(d, d.name) for d in sorted(folder.iterdir()) if d.is_dir()}
    methods = {m: v for m, v in methods.items() if v}
    if not methods:
        raise ValueError(f"no videos in {folder}: expected {folder}/*.mp4 or {folder}/<method>/*.mp4")
    return methods
