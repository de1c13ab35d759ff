"""A folder of videos scored for drift into one scores.json (eval.drift, eval.rollout), every input
checked before any compute: the folder's layout and prompts, each video's header, the output's name.

Video paths in the scores are relative to the scores file's folder when the videos lie under it (a run
folder moves as a whole), absolute otherwise. The metrics, slopes and the Drift Score: hiar/drift.py.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from hiar.drift import load_weighted_metrics, score_videos
from hiar.outputs import new_file, refuse_existing
from hiar.videoset import PROMPTS_FILE, VideoItem, find_videos


def videos_to_score(videos: str | Path) -> dict[str, list[VideoItem]]:
    """hiar.videoset.find_videos, with its failures on a plausible mistake said in one sentence."""
    videos = Path(videos)
    if videos.is_file():
        raise ValueError(f"--videos {videos} is a file: give the folder that holds the videos ({videos.parent})")
    try:
        return find_videos(videos)
    except json.JSONDecodeError as err:
        broken = _first_broken_json([videos / PROMPTS_FILE, *videos.glob(f"*/{PROMPTS_FILE}")]) or videos
        raise ValueError(f"{broken} is not valid JSON ({err}): fix it or delete it") from None


def _first_broken_json(paths: list[Path]) -> Path | None:
    for path in paths:
        try:
            json.loads(path.read_text())
        except json.JSONDecodeError:
            return path
        except OSError:
            continue
    return None


def check_readable(methods: dict[str, list[VideoItem]]) -> None:
    """Read every video's header (cheap) so a stray or truncated file stops the run before any scoring."""
    from hiar.video import video_fps

    for item in (v for items in methods.values() for v in items):
        try:
            video_fps(item.path)
        except (OSError, RuntimeError, StopIteration, KeyError) as err:
            lines = str(err).strip().splitlines()
            raise ValueError(f"{item.path} is not a readable video ({lines[-1] if lines else type(err).__name__}): "
                             "remove it from the folder or replace it") from None


def path_root(methods: dict[str, list[VideoItem]], out: Path) -> Path | None:
    """The folder of `out` when every video lies under it (paths in the scores stay relative, so a run
    folder moves as a whole); otherwise None: absolute paths, right wherever the scores file goes."""
    root = out.parent.resolve()
    inside = all(Path(v.path).resolve().is_relative_to(root) for items in methods.values() for v in items)
    return root if inside else None


def write_scores(videos: str, out: str, segments: int, timeline_bins: int, weights: str | None,
                 device: str, overwrite: bool = False) -> dict:
    """Check the inputs, score, publish `out` (never over an existing file without `overwrite`);
    ValueError before any compute on bad input."""
    if segments < 2:
        raise ValueError(f"--segments={segments}: a slope needs at least 2 segments")
    if timeline_bins < 0:
        raise ValueError(f"--timeline_bins={timeline_bins}: give 0 (no timeline) or more bins")
    out = Path(out)
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder: name the scores file to write, e.g. {out / 'scores.json'}")
    refuse_existing([out], overwrite)
    methods = videos_to_score(videos)
    check_readable(methods)
    with new_file(out, overwrite) as tmp:  # proves the folder writable before the long part
        extra, notices = load_weighted_metrics(weights, device)
        for notice in notices:
            print(notice, file=sys.stderr)
        scores = score_videos(methods, segments, extra, timeline_bins, root=path_root(methods, out))
        scores["skipped"] = notices
        tmp.write_text(json.dumps(scores, indent=1))
    for name, method in scores["methods"].items():
        s = method["summary"]
        print(f"{name}: {s['videos']} videos, {s['seconds']:.1f} s, drift score {s['drift_score']:.4f}")
    print(f"wrote {out}")
    return scores
