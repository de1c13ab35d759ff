"""The part of the VBench evaluation that runs inside VBench's own environment (.venv-vbench), called by
launch/vbench.sh; it imports vbench (and PySceneDetect), never this repository's packages.

    .venv-vbench/bin/python launch/vbench_worker.py check
    .venv-vbench/bin/python launch/vbench_worker.py full_info
    .venv-vbench/bin/python launch/vbench_worker.py scenes VIDEOS OUT.json [THRESHOLD]
    .venv-vbench/bin/python launch/vbench_worker.py score INFO.json RESULTS_DIR NAME

check      imports what the evaluation needs and runs torchvision's compiled nms (a torchvision built
           against another torch imports but fails there); exit 0 when all is well.
full_info  prints the path of VBench's standard prompt suite (vbench/VBench_full_info.json: 946 entries).
scenes     VBench-Long's scene split (vbench2_beta_long/utils.py: split_video_into_scenes): PySceneDetect's
           ContentDetector at THRESHOLD (VBenchLong.preprocess passes 35.0) on every VIDEOS/*.mp4 and
           VIDEOS/*/*.mp4; writes {relative path: [[start, end), ...]} in frames, [] when no cut is found
           (the video then stays whole, as upstream).
score      runs VBench's compute_<dimension> for every dimension named in INFO.json (VBench's full-info
           format, written by `python -m eval.vbench clips`) exactly as VBench.evaluate does after it has
           built that file, and writes RESULTS_DIR/NAME_eval_results.json ({dimension: [mean, [per clip]]}).
           Weights load from VBENCH_CACHE_DIR in VBench's local mode; the hub is offline unless
           VBENCH_DOWNLOAD=1, so nothing is fetched behind the user's back.
"""

import importlib
import json
import os
import sys
from pathlib import Path

DOWNLOAD = os.environ.get("VBENCH_DOWNLOAD") == "1"
if not DOWNLOAD:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def check() -> int:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pkg_resources  # noqa: F401  (setuptools<81: openai-clip and ViCLIP import it)
    import scenedetect  # noqa: F401
    import torch
    import torchvision
    import vbench.utils  # noqa: F401

    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 11.0, 11.0], [50.0, 50.0, 60.0, 60.0]])
    keep = torchvision.ops.nms(boxes, torch.tensor([0.9, 0.8, 0.7]), 0.5).tolist()
    assert keep == [0, 2], keep
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, vbench imports; "
          f"CUDA {'available' if torch.cuda.is_available() else 'not available (CPU)'}")
    return 0


def full_info() -> int:
    import vbench

    print(Path(vbench.__file__).with_name("VBench_full_info.json"))
    return 0


def scenes(videos: str, out: str, threshold: float = 35.0) -> int:
    from scenedetect import SceneManager, open_video
    from scenedetect.detectors import ContentDetector

    root, found = Path(videos), {}
    for path in sorted([*root.glob("*.mp4"), *root.glob("*/*.mp4")]):
        manager = SceneManager()
        manager.add_detector(ContentDetector(threshold=threshold))
        manager.detect_scenes(open_video(str(path)))
        found[str(path.relative_to(root))] = [[int(a.get_frames()), int(b.get_frames())]
                                              for a, b in manager.get_scene_list()]
    Path(out).write_text(json.dumps(found, indent=1))
    cut = sum(1 for s in found.values() if s)
    print(f"scene split (ContentDetector, threshold {threshold:g}): {cut} of {len(found)} videos have cuts")
    return 0


def score(info: str, results: str, name: str) -> int:
    import torch
    from vbench.utils import init_submodules, save_json

    entries = json.loads(Path(info).read_text())
    dims = list(dict.fromkeys(d for e in entries for d in e["dimension"]))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    submodules = init_submodules(dims, local=True, read_frame=False)
    scored = {}
    for dim in dims:
        compute = getattr(importlib.import_module(f"vbench.{dim}"), f"compute_{dim}")
        scored[dim] = compute(info, device, submodules[dim], imaging_quality_preprocessing_mode="longer")
        print(f"{dim}: {scored[dim][0]}")
    Path(results).mkdir(parents=True, exist_ok=True)
    save_json(scored, str(Path(results) / f"{name}_eval_results.json"))
    return 0


if __name__ == "__main__":
    command, *args = sys.argv[1:] or ["?"]
    if command == "scenes" and len(args) == 3:
        args[2] = float(args[2])
    commands = {"check": check, "full_info": full_info, "scenes": scenes, "score": score}
    if command not in commands:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    sys.exit(commands[command](*args))
