"""The evaluation harness: metrics on videos whose answer is known, drift math, the programs end to end."""

import ast
import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from eval import drift as drift_program
from eval import report as report_program
from eval import rollout as rollout_program
from eval import toy_videos
from hiar import report
from hiar.drift import (FLOORS, WEIGHTS, drift_score, fit_slope, frame_l1, frame_series, motion, segment_bounds,
                        segment_drift, ssim)
from hiar.toyworld import ToyClip, ToyObject, clip_to_video
from hiar.video import read_video

REPO = Path(__file__).resolve().parents[1]


def texture(size: int = 64, seed: int = 0) -> np.ndarray:
    """A smooth random RGB image (uint8 [H, W, 3]): trackable by optical flow, no flat areas."""
    noise = np.random.default_rng(seed).uniform(0, 255, (size, size, 3)).astype(np.float32)
    smooth = cv2.GaussianBlur(noise, (0, 0), 3)
    return ((smooth - smooth.min()) / np.ptp(smooth) * 255).astype(np.uint8)  # full contrast


def test_desaturating_video_has_the_known_saturation_slope():
    # One hue at fixed value, saturation falling linearly from 0.8 to 0.4 over F frames: the fitted change
    # from the video's start to its end is -0.4 * F / (F - 1) (time runs over frame centres, 0.5/F..1-0.5/F).
    f = 40
    s = np.linspace(0.8, 0.4, f)
    hsv = np.stack([np.full(f, 100), s * 255, np.full(f, 200)], -1).round().astype(np.uint8)  # [F, 3]
    frames = cv2.cvtColor(np.broadcast_to(hsv[:, None, None], (f, 16, 16, 3)).reshape(f * 16, 16, 3),
                          cv2.COLOR_HSV2RGB).reshape(f, 16, 16, 3)
    d = segment_drift(frame_series(frames), f, num_segments=5)
    assert d["slope"]["saturation"] == pytest.approx(-0.4 * f / (f - 1), abs=0.01)
    assert d["per_segment"]["saturation"][0] == pytest.approx(s[:8].mean(), abs=0.01)
    assert d["gap"]["saturation"] == pytest.approx(s[32:].mean() - s[:8].mean(), abs=0.01)


def test_static_video_has_no_motion_no_change_and_zero_drift():
    frames = np.repeat(texture()[None], 10, axis=0)
    series = frame_series(frames)
    assert np.all(series["frame_l1"] == 0) and np.all(series["motion"] < 0.01)  # Farneback reads ~0.003 px on equal frames
    assert np.allclose(series["ssim"], 1.0)
    d = segment_drift(series, len(frames))
    assert all(abs(s) < 1e-9 for s in d["slope"].values())
    assert d["drift_score"] < 1e-9


def test_ssim_of_flat_frames_is_the_closed_form():
    # For constant frames a and b the variances vanish: SSIM = (2ab + C1) / (a^2 + b^2 + C1).
    a, b, c1 = 100.0, 140.0, (0.01 * 255) ** 2
    fa, fb = np.full((32, 32, 3), a, np.uint8), np.full((32, 32, 3), b, np.uint8)
    assert ssim(fa, fb) == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), rel=1e-6)
    assert frame_l1(fa, fb) == 40.0


def test_optical_flow_measures_a_known_shift():
    image = texture(seed=1)
    shifted = np.roll(image, 2, axis=1)  # content moves 2 px right
    flow_mag = motion(image, shifted)
    assert flow_mag == pytest.approx(2.0, abs=0.1)


def test_toy_clip_scores_perfect_fidelity_and_its_true_speed():
    # A circle crossing the frame without touching a border: exact colours, constant area, speed 1.5 px/frame.
    clip = ToyClip("dark blue", (ToyObject("circle", "red", 6.0, 10.0, 30.0, "right", 1.5),))
    frames = clip.render(25)
    d = segment_drift(frame_series(frames, clip.caption), len(frames))
    assert max(d["per_segment"]["toy_background_error"]) == 0 and max(d["per_segment"]["toy_object_error"]) == 0
    assert min(d["per_segment"]["toy_presence"]) == 1
    assert np.mean(d["per_segment"]["toy_speed"]) == pytest.approx(1.5, abs=0.1)
    assert np.ptp(d["per_segment"]["toy_area"]) <= 0.1 * math.pi * 36  # the disc's pixel count barely moves


def test_toy_speed_and_presence_hold_across_a_border_of_the_world_that_wraps():
    # A square leaving the right border re-enters at the left, cut in two for a few frames: one object
    # moving 2 px a frame throughout, never a jump of half the frame.
    clip = ToyClip("black", (ToyObject("square", "yellow", 6.0, 50.0, 20.0, "right", 2.0),), motion="wrap")
    frames = clip.render(24)
    series = frame_series(frames, clip.caption)
    assert series["toy_presence"].min() == 1
    assert np.abs(series["toy_speed"] - 2.0).max() <= 0.5, series["toy_speed"]


def test_drift_score_is_the_published_weighted_mean():
    rel = {"saturation": -0.2, "sharpness": 0.1, "frame_l1": 0.4, "toy_speed": 9.0}  # toy metrics carry no weight
    assert drift_score(rel) == pytest.approx((0.2 + 0.1 + 0.5 * 0.4) / 2.5)
    assert set(WEIGHTS) == set(FLOORS)
    assert segment_bounds(10, 5) == [(0, 2), (2, 4), (4, 6), (6, 8), (8, 10)]
    assert fit_slope(np.array([0.0, 0.5, 1.0]), np.array([1.0, np.nan, 3.0])) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="segments"):
        segment_bounds(3, 5)


def test_drift_program_rejects_bad_folders_before_compute(tmp_path, capsys):
    assert drift_program.main(["--videos", str(tmp_path / "missing"), "--out", str(tmp_path / "s.json")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert drift_program.main(["--videos", str(tmp_path / "empty"), "--out", str(tmp_path / "s.json")]) == 2
    assert "no videos" in capsys.readouterr().err
    assert not (tmp_path / "s.json").exists()


def test_known_fade_is_scored_and_reported(tmp_path):
    # toy_videos -> drift -> report on real mp4 files: the faded method loses saturation and drifts from
    # its prompted colours; the truth does neither.
    run = tmp_path / "run"
    assert toy_videos.main(["--out", str(run / "videos"), "--num_videos", "2", "--seconds", "3", "--size", "32"]) == 0
    assert drift_program.main(["--videos", str(run / "videos"), "--out", str(run / "scores.json")]) == 0
    methods = json.loads((run / "scores.json").read_text())["methods"]
    faded, truth = methods["faded"]["summary"], methods["truth"]["summary"]
    assert faded["slope"]["saturation"] < -0.2 and abs(truth["slope"]["saturation"]) < 0.02
    assert faded["slope"]["toy_background_error"] > 30 and abs(truth["slope"]["toy_background_error"]) < 3
    assert faded["drift_score"] > 2 * truth["drift_score"]
    assert report_program.main([str(run)]) == 0
    md = (run / "report.md").read_text()
    assert "| faded |" in md and "| truth |" in md and "Drift Score" in md
    for png in ("metrics.png", "contact_sheet.png"):
        assert (run / "plots" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    sheet = cv2.imread(str(run / "plots" / "contact_sheet.png"))
    assert sheet.shape[1] == report.SHEET_LABEL_WIDTH + 5 * 128  # the label, then a 32 px frame x4 a segment
    written = json.loads((run / "report.json").read_text())
    assert written["methods"]["faded"]["drift_score"] == faded["drift_score"]


def test_rollout_gives_every_method_the_same_noise(tmp_path):
    # Two methods with identical settings and seeds must produce identical videos (noise is a pure
    # function of seed, sample, block and step); the length covers the requested seconds.
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle moving left on a black background\n")
    args = ["--out", str(tmp_path / "run"), "--config_path", "tiny", "--data_path", str(prompts), "--seconds", "1",
            "--device", "cpu", "--segments", "3"]
    assert rollout_program.main(args + ["--method", "a=:video.window_frames=6"] * 2) == 2  # same name twice
    assert rollout_program.main(args + ["--method", "a=:window_frames"]) == 2  # an override needs key=value
    assert rollout_program.main(args + ["--method", "a=:video.window_frames=0"]) == 2  # memory would grow
    assert not (tmp_path / "run" / "videos").exists()
    assert rollout_program.main(args + ["--method", "a=:video.window_frames=6:sampling.method=frame_first",
                                        "--method", "b=:video.window_frames=6:sampling.method=frame_first"]) == 0
    a, b = (read_video(tmp_path / "run" / "videos" / m / "000-0.mp4") for m in "ab")
    assert len(a) >= 8 and np.array_equal(a, b)
    scores = json.loads((tmp_path / "run" / "scores.json").read_text())["methods"]
    assert scores["a"]["summary"]["drift_score"] == scores["b"]["summary"]["drift_score"]


def test_weighted_metrics_load_from_a_local_folder_or_say_why_not(tmp_path):
    # A tiny random DINOv2 in a transformers folder: equal frames have cosine 1, different ones less.
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    from hiar.drift import load_weighted_metrics

    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                             image_size=28, patch_size=14)).save_pretrained(tmp_path / "dinov2")
    BitImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}).save_pretrained(
        tmp_path / "dinov2")
    fns, notices = load_weighted_metrics(tmp_path)
    assert set(fns) == {"dinov2"} and len(notices) == 3 and all("skipped" in n for n in notices)
    frames = np.stack([texture(32, 0), texture(32, 0), texture(32, 1)])
    sim = fns["dinov2"](frames)
    assert sim[0] == pytest.approx(1.0, abs=1e-5) and sim[1] < 0.999
    assert len(load_weighted_metrics(None)[1]) == 4  # all four skipped, one line each


def test_results_doc_keeps_the_written_reading_around_the_generated_tables(tmp_path):
    from eval.toy_results import markers, write_doc

    doc = tmp_path / "results.md"
    (begin, end), (begin10, end10) = markers("1x"), markers("10x")
    write_doc(doc, "1x", "table one")
    assert begin in doc.read_text() and "table one" in doc.read_text()
    doc.write_text(doc.read_text().replace(begin, "Intro by a person.\n" + begin) + "\nReading by a person.\n")
    write_doc(doc, "1x", "table two")
    write_doc(doc, "10x", "ten times longer")  # a new section goes to the end
    write_doc(doc, "10x", "ten times longer, again")
    text = doc.read_text()
    assert "table one" not in text and "table two" in text and text.count("ten times longer") == 1
    assert (text.index("Intro by a person.") < text.index(begin) < text.index("table two") < text.index(end)
            < text.index("Reading by a person.") < text.index(begin10) < text.index("again") < text.index(end10))


def test_results_by_length_lines_up_every_evaluated_length(tmp_path):
    from eval.toy_results import by_length

    row = {"colour_fidelity": 0.5, "moving": 0.25, "drift_score": 0.125, "slope": {}}
    for label, rows in {"1x": {"hiar": row, "self_forcing": row}, "10x": {"hiar": {**row, "moving": 0.75}}}.items():
        (tmp_path / label).mkdir()
        (tmp_path / label / "summary.json").write_text(json.dumps(rows))
    lines = by_length(tmp_path).splitlines()
    assert "| variant | 1x | 10x |" in lines
    assert "| hiar | 50% / 25% / 0.125 | 50% / 75% / 0.125 |" in lines
    assert "| self_forcing | 50% / 25% / 0.125 | - |" in lines
    assert not any(line.startswith("| hiar_no_fkl") for line in lines)  # evaluated at no length


def test_results_report_what_the_prompts_say_per_length_and_phrasing(tmp_path, monkeypatch, capsys):
    """eval.toy_results asks eval.toy_fidelity for both caption sets, in short clips and in fewer videos
    of each --fidelity_seconds, and tabulates each (variant, length, phrasing) row from what it wrote; a
    bad length is refused before any program runs."""
    from eval import toy_results

    (tmp_path / "runs" / "hiar").mkdir(parents=True)
    (tmp_path / "runs" / "hiar" / "model.safetensors").write_bytes(b"")
    calls = []

    def measures(colour: float) -> dict:
        return {"colour": colour, "shape": 0.5, "direction_of_moving": 0.75, "count": 1.0, "presence": 0.875,
                "presence_by_segment": [1.0, 0.25], "direction_by_segment": [0.75, 0.625], "colour_fidelity": colour,
                "moving": 0.5}

    def run_program(program: str, *args: str) -> int:  # each program's files, as it writes them
        calls.append((program, args))
        if program == "toy_fidelity":
            out, long = Path(args[args.index("--out") + 1]), "--seconds" in args
            out.mkdir(parents=True)
            sets = {"template": measures(0.25 if long else 1.0), "held_out": measures(0.125 if long else 0.5)}
            (out / "results.json").write_text(json.dumps({**sets["template"], "by_captions": sets}))
        elif program == "rollout":
            (tmp_path / "res" / "long" / "plots").mkdir(parents=True)
        elif program == "report":
            long = tmp_path / "res" / "long"
            for name in ("plots/metrics.png", "plots/contact_sheet.png"):
                (long / name).write_bytes(b"")
            (long / "report.md").write_text("# Drift report\n\n![metrics against time](plots/metrics.png)\n")
            (long / "scores.json").write_text(json.dumps(
                {"methods": {"hiar": {"summary": {"drift_score": 0.1, "slope": {}}}}}))
        return 0

    monkeypatch.setattr(toy_results, "run_program", run_program)
    common = ["--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "res"), "--doc", str(tmp_path / "doc.md")]
    assert toy_results.main([*common, "--fidelity_seconds", "60", "0"]) == 2
    assert "give a clip or more and positive lengths" in capsys.readouterr().err and not calls
    trained = "model.patch_size=[1,1,1]"  # how the runs were trained: every program samples them so
    assert toy_results.main([*common, "--fidelity_seconds", "60", "300", "--fidelity_clips", "3", trained]) == 0
    fidelity = [args for program, args in calls if program == "toy_fidelity"]
    assert len(fidelity) == 3 and all(a[a.index("--captions") + 1:][:2] == ("template", "held_out") for a in fidelity)
    assert all(trained in a for a in fidelity)
    (rollout,) = [args for program, args in calls if program == "rollout"]
    methods = [a for a in rollout if a.startswith("--method=")]
    assert methods == [f"--method=hiar={tmp_path / 'runs' / 'hiar' / 'model.safetensors'}:{trained}"]
    assert [a[a.index("--num_clips") + 1] for a in fidelity] == ["40", "3", "3"]
    assert [a[a.index("--seconds") + 1] for a in fidelity[1:]] == ["60", "300"] and "--seconds" not in fidelity[0]
    lines = (tmp_path / "doc.md").read_text().splitlines()
    assert any(f"with {trained}." in line for line in lines)
    assert "| hiar | short | held_out | 50% | 50% | 75% | 62% | 100% | 88% | 25% |" in lines
    assert "| hiar | 300 s | template | 25% | 50% | 75% | 62% | 100% | 88% | 25% |" in lines
    assert sum(line.startswith("| hiar | ") and " s | " in line for line in lines) == 4
    summary = json.loads((tmp_path / "doc" / "1x" / "summary.json").read_text())["hiar"]
    assert summary["colour_fidelity"] == 1.0 and summary["prompts"]["60 s"]["held_out"]["colour"] == 0.125
    report = (tmp_path / "doc" / "1x" / "report.md").read_text()  # copied beside its plots: links that resolve
    assert "](metrics.png)" in report and (tmp_path / "doc" / "1x" / "metrics.png").exists()


def test_direction_by_scene_tells_a_lone_object_from_two_and_sees_them_move_alike():
    """Two objects prompted two ways, one of them drawn moving the other's way, the other right; a lone
    object right; two prompted the same way, one wrong; and objects that do not move, left out."""
    from hiar.toyfidelity import direction_by_scene

    def thing(direction, measured, moves=True):
        return {"direction": direction, "direction_measured": measured, "direction_ok": direction == measured,
                "moves": moves}

    clips = [{"prompted": [thing("left", "right"), thing("right", "right")]},  # the first moves the other's way
             {"prompted": [thing("up", "left"), thing("down", "down", moves=False)]},  # wrong, not the other's way
             {"prompted": [thing("up", "up")]},
             {"prompted": [thing("left", "left"), thing("left", "down")]},
             {"prompted": [thing("down", None, moves=False)]}]
    scenes = direction_by_scene(clips)
    assert scenes["one_object"] == 1.0 and scenes["two_same_way"] == 0.5
    assert scenes["two_ways"] == pytest.approx(1 / 3) and scenes["other_objects_way"] == 0.5
    assert all(math.isnan(v) for v in direction_by_scene([]).values())


def test_toy_fidelity_of_the_codec_ceiling_passes_every_clip(tmp_path):
    """Held-out clips through the toy codec pass both checks: the measurement is not what fails a model.
    With --speed every object moves at that speed, and the measurement reads it back."""
    from eval import toy_fidelity
    from hiar.checkpoints import save_model
    from hiar.config import load_config

    from conftest import random_model

    cfg = load_config("tiny")
    path = save_model(random_model(cfg), cfg, tmp_path / "m.safetensors")
    result = toy_fidelity.main(["--checkpoint", str(path), "--sampler", "codec", "--num_clips", "6", "--out",
                                str(tmp_path / "f"), "video.height=64", "video.width=64"])
    assert result["colour_fidelity"] == 1.0 and result["moving"] == 1.0
    assert result["object_speeds"]["in_range"] == 1.0 and (tmp_path / "f" / "contact_sheet.png").is_file()
    # every object at one speed, measured back: 0 (none moves) and 2 px a frame
    common = ["--checkpoint", str(path), "--sampler", "codec", "--num_clips", "6", "video.height=64", "video.width=64"]
    for speed in (0, 2):
        fixed = toy_fidelity.main([*common, "--speed", str(speed), "--out", str(tmp_path / f"at{speed}")])
        speeds = [o["speed"] for c in fixed["by_captions"]["template"]["per_clip"] for o in c["prompted"]]
        assert fixed["speed"] == speed and len(speeds) == 9
        assert abs(np.median(speeds) - speed) < 0.1 and np.allclose(speeds, speed, atol=0.35)  # fits on a grid
        assert fixed["moving"] == (1.0 if speed else 0.0)
    with pytest.raises(ValueError, match="for the codec sampler only"):
        toy_fidelity.main(["--checkpoint", str(path), "--sampler", "teacher", "--speed", "1"])
    # the same scenes phrased as training phrases its clips: read back as well, in other words than the template
    phrased = toy_fidelity.main([*common, "--captions", "varied", "template", "--out", str(tmp_path / "varied")])
    varied, template = (phrased["by_captions"][s] for s in ("varied", "template"))
    assert varied["colour"] == template["colour"] == 1.0 and varied["direction_of_moving"] == 1.0
    assert all(v["caption"] != c["caption"] for v, c in zip(varied["per_clip"], template["per_clip"]))


def test_toy_fidelity_continues_held_out_clips_with_the_teacher(tmp_path, monkeypatch, capsys):
    """--context N: the teacher draws each held-out clip from its own first N latent frames (rendered and
    encoded), which it is given exactly; refused for other samplers and for N that leaves nothing to draw."""
    from eval import toy_fidelity
    from hiar import toyteacher
    from hiar.checkpoints import save_model
    from hiar.codecs import ToyDCTCodec
    from hiar.config import load_config
    from hiar.toyfidelity import held_out_clips

    from conftest import random_model

    cfg = load_config("tiny", ["video.codec=toy_dct", "video.vae_stride=[1,8,8]", "video.height=64",
                               "video.width=64", "video.num_latent_frames=6", "train.sample_steps=2"])
    path = save_model(random_model(cfg), cfg, tmp_path / "m.safetensors")
    given = []
    samples = toyteacher.teacher_samples
    monkeypatch.setattr(toyteacher, "teacher_samples", lambda *a, **k: given.append(k["context"]) or samples(*a, **k))
    monkeypatch.setattr("hiar.toyfidelity.teacher_samples", toyteacher.teacher_samples)
    common = ["--checkpoint", str(path), "--sampler", "teacher", "--num_clips", "2", "--out", str(tmp_path / "f")]
    result = toy_fidelity.main([*common, "--context", "1"])
    assert result["context"] == 1 and result["clips"] == 2
    assert "last fifth n/a" in capsys.readouterr().out  # 6-frame clips: too short to judge by fifth
    first = ToyDCTCodec().encode(torch.stack([torch.from_numpy(clip_to_video(c.render(6))) for c in held_out_clips(2)]))
    assert len(given) == 1 and torch.equal(given[0], first[:, :1])
    for bad in (["--context", "6"], ["--context", "1", "--sampler", "codec"]):
        with pytest.raises(ValueError, match="--context"):
            toy_fidelity.main([*common, *bad])


def test_toy_fidelity_measures_a_set_of_ode_pairs_against_its_own_captions(tmp_path):
    """--trajectories: clean ends that are rendered clips encoded pass as the codec's round trip does; ends
    of zeros (no objects) fail every object; and the sampling options do not apply to it."""
    from eval import toy_fidelity
    from hiar.checkpoints import save_model
    from hiar.codecs import build_codec, rendered_frames
    from hiar.config import load_config
    from hiar.toyfidelity import captions_of, held_out_clips
    from hiar.toyteacher import encode_clips
    from hiar.trajectories import shard_path, write_manifest, write_shard

    from conftest import random_model

    cfg = load_config("tiny", ["video.codec=toy_dct", "video.vae_stride=[1,8,8]", "video.height=64",
                               "video.width=64", "video.num_latent_frames=6"])
    path = save_model(random_model(cfg), cfg, tmp_path / "m.safetensors")
    clips = held_out_clips(4, motion=cfg.video.toy_motion)
    ends = encode_clips(build_codec(cfg), clips, rendered_frames(cfg))
    for name, finals in (("rendered", ends), ("blank", torch.zeros_like(ends))):
        folder = tmp_path / name
        folder.mkdir()
        records = [{"key": f"{i:04d}", "caption": caption, "points": final[None], "timesteps": [1000.0],
                    "final": final} for i, (final, caption) in enumerate(zip(finals, captions_of(clips, "template")))]
        write_shard(shard_path(folder, 0), records, torch.float32)
        write_manifest(folder, 1, 4, 4, {}, "")
    common = ["--checkpoint", str(path), "--num_clips", "3", "--out", str(tmp_path / "f")]
    rendered = toy_fidelity.main([*common, "--trajectories", str(tmp_path / "rendered")])["by_captions"]["trajectories"]
    assert rendered["clips"] == 3 and rendered["colour"] == 1.0 and rendered["background"] == 1.0
    blank = toy_fidelity.main([*common, "--trajectories", str(tmp_path / "blank")])["by_captions"]["trajectories"]
    assert blank["colour"] == 0.0 and blank["presence"] == 0.0
    with pytest.raises(ValueError, match="--trajectories"):
        toy_fidelity.main([*common, "--trajectories", str(tmp_path / "blank"), "--sampler", "teacher"])


def eval_imports(path: Path) -> list[str]:
    """What the Python file `path` imports from the eval package: `import eval...`, `from eval... import`,
    and relative imports (which, in eval/, name the package too)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.split(".")[0] == "eval"]
        elif isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").split(".")[0] == "eval"):
            found.append("." * node.level + (node.module or ""))
    return found


def test_evaluation_programs_share_code_only_through_the_library(tmp_path):
    """No eval/ program imports another (or eval/__init__.py): what they share lives in hiar/."""
    programs = sorted((REPO / "eval").glob("*.py"))
    assert {"drift.py", "rollout.py", "report.py", "toy_results.py", "vbench.py"} <= {p.name for p in programs}
    assert {p.name: eval_imports(p) for p in programs if eval_imports(p)} == {}
    (init,) = ast.parse((REPO / "eval" / "__init__.py").read_text()).body  # a docstring, nothing else
    assert isinstance(init, ast.Expr) and isinstance(init.value, ast.Constant) and isinstance(init.value.value, str)
    # every spelling of such an import is caught; a module merely named like the package is not
    probe = tmp_path / "probe.py"
    for line in ("from eval import exit_code", "from eval.drift import write_scores", "import eval.report",
                 "import os, eval", "from . import report", "from .drift import write_scores",
                 "def main():\n    from eval import toy_fidelity"):
        probe.write_text(line + "\n")
        assert eval_imports(probe), line
    probe.write_text("import evaluate\nfrom hiar.outputs import exit_code\nimport importlib\n")
    assert eval_imports(probe) == []


def test_toy_compare_tells_a_difference_from_the_draw_of_clips(tmp_path, capsys):
    """eval.toy_compare on the same clips drawn truly (every object), blank (background only) and, in a third
    run, truly but for one clip: truth against itself differs by exactly 0; truth against blank by -100% on
    colour and presence, an interval far from 0; one lost clip of 8 by -1/8 of the objects, an interval
    that holds 0 (the draw of clips could give it). Runs of other clips are refused."""
    import dataclasses

    from eval import toy_compare
    from hiar.toyfidelity import held_out_clips, prompt_fidelity

    clips = held_out_clips(8)
    truth = [prompt_fidelity(c.render(12), c.caption) for c in clips]
    blank = [prompt_fidelity(dataclasses.replace(c, objects=()).render(12), c.caption) for c in clips]
    one_lost = blank[:1] + truth[1:]
    for name, per_clip in (("truth", truth), ("blank", blank), ("one_lost", one_lost)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps({"by_captions": {"template": {"per_clip": per_clip}}}))
    same = toy_compare.main([str(tmp_path / "truth"), str(tmp_path / "truth"), "--resamples", "200"])["template"]
    assert all(m["difference"] == m["low"] == m["high"] == 0 for m in same.values() if not math.isnan(m["a"]))
    gone = toy_compare.main([str(tmp_path / "truth"), str(tmp_path / "blank"), "--resamples", "200",
                             "--out", str(tmp_path / "c.json")])["template"]
    assert gone["colour"]["difference"] == gone["presence"]["difference"] == -1.0
    assert gone["colour"]["high"] == -1.0 and gone["presence"]["high"] < -0.9
    assert json.loads((tmp_path / "c.json").read_text())["by_captions"]["template"]["colour"]["a"] == 1.0
    assert "| template | colour | 100% | 0% | **-100** (-100, -100) |" in capsys.readouterr().out
    lost = toy_compare.main([str(tmp_path / "truth"), str(tmp_path / "one_lost"), "--resamples", "200"])["template"]
    objects = sum(len(c["prompted"]) for c in truth)
    assert lost["colour"]["difference"] == pytest.approx(-len(truth[0]["prompted"]) / objects)
    assert lost["colour"]["low"] < lost["colour"]["difference"] and lost["colour"]["high"] == 0.0
    (tmp_path / "other").mkdir()
    reordered = {"by_captions": {"template": {"per_clip": truth[::-1]}}}
    (tmp_path / "other" / "results.json").write_text(json.dumps(reordered))
    assert toy_compare.cli([str(tmp_path / "truth"), str(tmp_path / "other")]) == 2
    assert toy_compare.cli([str(tmp_path / "truth"), str(tmp_path / "missing")]) == 2
    assert "no results.json" in capsys.readouterr().err


def test_toy_fidelity_reads_a_training_checkpoint_generator_or_its_ema(tmp_path):
    """--checkpoint .../model.pt (train/distill.py's layout: generator, generator_ema, config) measures the
    generator, or with --use_ema the EMA, exactly as the same weights saved as a model.safetensors."""
    from eval import toy_fidelity
    from hiar.checkpoints import save_model
    from hiar.config import config_to_dict, load_config

    from conftest import random_model

    cfg = load_config("tiny", ["video.codec=toy_dct", "video.vae_stride=[1,8,8]", "video.height=64",
                               "video.width=64", "video.num_latent_frames=6"])
    generator, ema = random_model(cfg, seed=1), random_model(cfg, seed=2)
    torch.save({"generator": generator.state_dict(), "generator_ema": ema.state_dict(), "step": 5,
                "config": config_to_dict(cfg)}, tmp_path / "model.pt")

    def measured(checkpoint, *flags):
        result = toy_fidelity.main(["--checkpoint", str(checkpoint), "--num_clips", "2", *flags,
                                    "--out", str(tmp_path / "f")])
        return json.dumps(result["by_captions"]["template"]["per_clip"])  # text: NaN speeds compare equal

    for weights, flags in ((generator, []), (ema, ["--use_ema"])):
        saved = save_model(weights, cfg, tmp_path / "m.safetensors")
        assert measured(tmp_path / "model.pt", *flags) == measured(saved)
    assert measured(tmp_path / "model.pt") != measured(tmp_path / "model.pt", "--use_ema")


def test_weight_moves_measures_how_far_and_which_way_checkpoints_moved(tmp_path, capsys):
    """scripts/weight_moves.py: moves d, 2d (a training checkpoint's generator) and -d (its EMA) from a
    reference measure 1 : 2 : 1 in norm, with cosines +1 and -1; --out writes half of the 2d move (= d)
    and a random move as far as 2d; another architecture or an incomplete --out is one error line."""
    import importlib.util

    from hiar.checkpoints import save_model
    from hiar.config import config_to_dict, load_config

    from conftest import random_model

    script = Path(__file__).parent.parent / "scripts" / "weight_moves.py"
    spec = importlib.util.spec_from_file_location("weight_moves", script)
    weight_moves = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(weight_moves)
    cfg = load_config("tiny")
    reference, step = random_model(cfg, seed=1), random_model(cfg, seed=2).state_dict()
    moved = {k: {k2: v + scale * (step[k2] - v) for k2, v in reference.state_dict().items()} for k, scale in
             (("once", 0.01), ("twice", 0.02), ("back", -0.01))}
    save_model(reference, cfg, tmp_path / "reference.safetensors")
    once = random_model(cfg)
    once.load_state_dict(moved["once"])
    save_model(once, cfg, tmp_path / "once.safetensors")
    torch.save({"generator": moved["twice"], "generator_ema": moved["back"], "config": config_to_dict(cfg)},
               tmp_path / "model.pt")
    relative, cosines = weight_moves.moves(
        weight_moves.flat_weights(str(tmp_path / "reference.safetensors"), cfg, False),
        [weight_moves.flat_weights(str(tmp_path / p), cfg, ema) for p, ema in
         (("once.safetensors", False), ("model.pt", False), ("model.pt", True))])
    assert relative[1] == pytest.approx(2 * relative[0], rel=1e-6) and relative[2] == pytest.approx(relative[0])
    assert cosines[0][1] == pytest.approx(1.0) and cosines[0][2] == pytest.approx(-1.0)
    assert weight_moves.main([str(tmp_path / "reference.safetensors"), str(tmp_path / "model.pt"), "--use_ema"]) == 0
    assert "| 1 | " in capsys.readouterr().out
    ref = str(tmp_path / "reference.safetensors")
    for move, out in ((["--along", "0.5"], "half.safetensors"), (["--random", "3"], "random.safetensors")):
        assert weight_moves.main([ref, str(tmp_path / "model.pt"), *move, "--out", str(tmp_path / out)]) == 0
    relative, cosines = weight_moves.moves(weight_moves.flat_weights(ref, cfg, False), [
        weight_moves.flat_weights(str(tmp_path / p), cfg, False) for p in ("once.safetensors", "half.safetensors",
                                                                          "random.safetensors", "model.pt")])
    assert relative[1] == pytest.approx(relative[0], rel=1e-5) and cosines[0][1] == pytest.approx(1.0)
    assert relative[2] == pytest.approx(relative[3], rel=1e-5) and abs(cosines[2][3]) < 0.1  # as far, another way
    capsys.readouterr()
    assert weight_moves.main([ref, str(tmp_path / "model.pt"), "--along", "0.5"]) == 2  # a move, but nowhere to write
    assert weight_moves.main([ref, str(tmp_path / "model.pt"), "--along", "1", "--random", "1", "--out", "x"]) == 2
    assert "give --out with either --along or --random" in capsys.readouterr().err
    wider = load_config("tiny", ["model.ffn_dim=128"])
    save_model(random_model(wider), wider, tmp_path / "wider.safetensors")
    assert weight_moves.main([str(tmp_path / "reference.safetensors"), str(tmp_path / "wider.safetensors")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: "), err


def test_validation_clips_are_other_clips_and_noise_than_the_test_clips(tmp_path):
    """--split validation draws other scenes, phrasings and student noise than the test clips; the record
    says which split it measured, eval.toy_compare refuses to pair the two, and the teacher sampler (whose
    noise is the clip's index) measures the test clips only."""
    from eval import toy_compare, toy_fidelity
    from hiar.config import config_to_dict, load_config
    from hiar.sampling import block_noise
    from hiar.toyfidelity import CLIP_SETS, captions_of, held_out_clips

    from conftest import random_model

    test, validation = held_out_clips(16), held_out_clips(16, split="validation")
    assert not {c.caption for c in test} & {c.caption for c in validation}
    assert captions_of(test, "held_out") != captions_of(validation, "held_out")
    cfg = load_config("tiny", ["video.codec=toy_dct", "video.vae_stride=[1,8,8]", "video.height=64",
                               "video.width=64", "video.num_latent_frames=6"])
    noise = [block_noise(cfg, CLIP_SETS[split][1], range(2)) for split in ("test", "validation")]
    assert not torch.equal(noise[0].initial(0), noise[1].initial(0))
    torch.save({"generator": random_model(cfg, seed=1).state_dict(), "config": config_to_dict(cfg)},
               tmp_path / "model.pt")
    runs = {}
    for split in CLIP_SETS:
        runs[split] = toy_fidelity.main(["--checkpoint", str(tmp_path / "model.pt"), "--num_clips", "2",
                                         "--split", split, "--out", str(tmp_path / split)])
        assert json.loads((tmp_path / split / "results.json").read_text())["split"] == split
    captions = {s: [c["caption"] for c in r["by_captions"]["template"]["per_clip"]] for s, r in runs.items()}
    assert captions["test"] != captions["validation"]
    assert toy_compare.cli([str(tmp_path / "test"), str(tmp_path / "validation")]) == 2
    with pytest.raises(ValueError, match="teacher sampler samples the test clips"):
        toy_fidelity.main(["--checkpoint", str(tmp_path / "model.pt"), "--sampler", "teacher", "--split",
                           "validation", "--out", str(tmp_path / "t")])


def test_toy_select_chooses_the_best_checkpoint_on_validation_clips_and_exports_it(tmp_path, monkeypatch, capsys):
    """eval.toy_select measures every kept checkpoint (or every --every-th) on the validation clips, chooses
    the highest mean of colour, presence and objects at the world's speeds over both caption sets (ties: the
    later), keeps what it measured on a rerun and exports the chosen weights, generator or EMA, as a
    model.safetensors. Sampling is stubbed with known shares; the export is real."""
    import numpy as np

    from eval import toy_select
    from hiar.checkpoints import load_generator
    from hiar.config import config_to_dict, load_config

    from conftest import random_model

    cfg = load_config("tiny")
    # step: (colour, presence, objects at the world's speeds)
    shares = {2: (0.5, 0.5, 0.5), 4: (0.75, 0.75, 0.75), 6: (0.5, 1.0, 0.75), 8: (0.25, 0.5, 0.375)}
    models = {}
    for step in shares:
        models[step] = (random_model(cfg, seed=step), random_model(cfg, seed=100 + step))
        folder = tmp_path / "run" / "checkpoints" / f"step-{step:08d}"
        folder.mkdir(parents=True)
        torch.save({"generator": models[step][0].state_dict(), "generator_ema": models[step][1].state_dict(),
                    "step": step, "config": config_to_dict(cfg)}, folder / "model.pt")
    sampled = []

    def sample(checkpoint, overrides, sampler, num_clips, batch_size, caption_sets, use_ema, split):
        assert split == "validation" and sampler == "student"
        sampled.append(checkpoint)
        colour, presence, at_speed = shares[int(Path(checkpoint).parent.name.removeprefix("step-"))]
        speeds = {"in_range": at_speed, "faster": 1 - at_speed, "slower": 0.0, "unseen": 0.0}
        sets = {name: {"clips": num_clips, "colour": colour, "presence": presence, "direction_of_moving": 0.5,
                       "object_speeds": speeds, "shape": 0.0, "count": 1.0, "direction": 0.5, "presence_by_segment": [presence],
                       "direction_by_segment": [0.5], "objects": 3, "colour_fidelity": colour, "moving": 0.5}
                for name in caption_sets}
        return {**sets["template"], "by_captions": sets}, [np.zeros((6, 8, 8, 3), np.uint8)]

    monkeypatch.setattr(toy_select, "evaluate", sample)
    export = tmp_path / "chosen.safetensors"
    selection = toy_select.main(["--run", str(tmp_path / "run"), "--num_clips", "4", "--use_ema",
                                 "--export", str(export)])
    assert selection["chosen"] == 6 and len(sampled) == 4  # 4 and 6 both score 0.75: the later
    assert [r["score"] for r in selection["candidates"]] == [0.5, 0.75, 0.75, 0.375]
    assert "| 6 (chosen) | 75% |" in capsys.readouterr().out
    assert (tmp_path / "run" / "selection_ema" / "selection.png").stat().st_size > 0
    exported = load_generator(export)[0].state_dict()
    assert all(torch.equal(exported[k], v) for k, v in models[6][1].state_dict().items())  # the EMA at 6
    sampled.clear()
    assert toy_select.main(["--run", str(tmp_path / "run"), "--num_clips", "4", "--use_ema"])["chosen"] == 6
    assert sampled == []  # measured already
    assert toy_select.main(["--run", str(tmp_path / "run"), "--num_clips", "4", "--every", "4"])["chosen"] == 4
    assert len(sampled) == 2  # the generators at 4 and 8, in a folder of their own
    assert (tmp_path / "run" / "selection_ema" / "step-00000004" / "results.json").is_file()
    capsys.readouterr()
    assert toy_select.cli(["--run", str(tmp_path / "run"), "--every", "5"]) == 2
    assert toy_select.cli(["--run", str(tmp_path / "run"), "--export", "x.pt"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 2 and all(line.startswith("error: ") for line in err), err
