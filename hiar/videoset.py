"""A folder of videos to evaluate, from any system: one mp4 a prompt (and sample), grouped by method.

Layouts accepted (checked before any compute):

    videos/*.mp4                    one method, named after the folder
    videos/<method>/*.mp4           one method a subfolder

A video's prompt comes from, in order: `prompts.json` beside it ({"file name.mp4": "prompt"}, VBench's
--prompt_file format, written by eval/rollout.py), the latents file inference.py writes with
--save_latents (`<stem>.latents.safetensors`, metadata "prompt"), or the file name as inference.py and
VBench write it ("<prompt>-<sample>.mp4").
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

PROMPTS_FILE = "prompts.json"


@dataclass(frozen=True)
class VideoItem:
    method: str
    path: Path
    prompt: str

    @property
    def name(self) -> str:
        return self.path.stem


def prompt_from_filename(path: Path) -> str:
    """'a red circle moving left-0.mp4' -> 'a red circle moving left' (a trailing -<sample> is dropped)."""
    return re.sub(r"-\d+$", "", path.stem)


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
