"""Faults of the evaluation programs and of the pipeline: outputs anywhere, never replaced without
--overwrite, claimed so concurrent runs never clobber each other, bad input as one line before compute,
and a pipeline stage stopped by SIGTERM named by the others."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch.distributed as dist

from eval import bench
from eval import drift as drift_program
from eval import report as report_program
from eval import rollout as rollout_program
from eval import toy_fidelity, toy_results, toy_videos, vbench
from hiar import report, scoring
from hiar.outputs import publish
from hiar.parallel import FAILED_KEY, PID_KEY, PipelineError, StageGroup, _alive

ROOT = Path(__file__).resolve().parent.parent


def one_error_line(err: str) -> str:
    """The program's stderr must be a single 'error: ...' line (no traceback, no tool dump)."""
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def forbid(monkeypatch, module, name: str) -> None:
    """Make `module.name` fail the test if it is called: the program must stop before it."""
    def called(*args, **kwargs):
        raise AssertionError(f"{name} ran: the bad input was not refused before compute")
    monkeypatch.setattr(module, name, called)


def files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def videos(tmp_path) -> Path:
    """truth/ and faded/, one 8-frame 32 px video each."""
    folder = tmp_path / "run" / "videos"
    assert toy_videos.main(["--out", str(folder), "--num_videos", "1", "--seconds", "1", "--size", "32"]) == 0
    return folder


# -- eval.drift: --out anywhere, never replaced, bad videos refused before scoring -------------------------------


def test_drift_writes_scores_anywhere_and_the_report_finds_the_videos(tmp_path, videos, monkeypatch):
    inside, sibling = tmp_path / "run" / "scores.json", tmp_path / "elsewhere" / "scores.json"
    assert drift_program.main(["--videos", str(videos), "--out", str(sibling)]) == 0
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    assert drift_program.main(["--videos", str(videos), "--out", "relative/scores.json"]) == 0
    assert drift_program.main(["--videos", str(videos), "--out", str(inside)]) == 0

    def path(scores: Path) -> str:
        return json.loads(scores.read_text())["methods"]["truth"]["videos"]["000-0"]["path"]

    assert path(inside) == "videos/truth/000-0.mp4"  # under the scores' folder: relative, the run moves whole
    assert path(sibling) == path(tmp_path / "cwd" / "relative" / "scores.json") == str(videos / "truth" / "000-0.mp4")
    assert report_program.main([str(sibling.parent)]) == 0  # reads the videos through the absolute paths
    assert (sibling.parent / "plots" / "contact_sheet.png").is_file()


def test_drift_never_replaces_its_out_without_overwrite(tmp_path, videos, capsys, monkeypatch):
    out = tmp_path / "scores.json"
    out.write_text("kept")
    forbid(monkeypatch, scoring, "score_videos")
    assert drift_program.main(["--videos", str(videos), "--out", str(out)]) == 2
    assert "already exists: pass --overwrite" in one_error_line(capsys.readouterr().err) and out.read_text() == "kept"
    assert drift_program.main(["--videos", str(videos), "--out", str(tmp_path)]) == 2
    assert "is a folder" in one_error_line(capsys.readouterr().err)
    monkeypatch.undo()
    assert drift_program.main(["--videos", str(videos), "--out", str(out), "--overwrite"]) == 0
    assert "truth" in json.loads(out.read_text())["methods"]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # no temporary left beside it


@pytest.mark.parametrize("spoil,message", [
    (lambda v: (v / "truth" / "notes.mp4").write_text("not a video"), "notes.mp4 is not a readable video"),
    (lambda v: (v / "faded" / "crashed.mp4").write_bytes(b""), "crashed.mp4 is not a readable video"),
    (lambda v: (v / "faded" / "prompts.json").write_text("{broken"), "faded/prompts.json is not valid JSON"),
])
def test_drift_refuses_a_bad_file_among_the_videos_before_scoring(tmp_path, videos, capsys, monkeypatch, spoil,
                                                                  message):
    spoil(videos)
    forbid(monkeypatch, scoring, "score_videos")
    assert drift_program.main(["--videos", str(videos), "--out", str(tmp_path / "s.json")]) == 2
    assert message in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "s.json").exists()


def test_drift_names_a_file_given_as_the_video_folder(videos, tmp_path, capsys):
    assert drift_program.main(["--videos", str(videos / "truth" / "000-0.mp4"), "--out", str(tmp_path / "s")]) == 2
    assert "is a file: give the folder" in one_error_line(capsys.readouterr().err)


# -- eval.rollout: where README says, never replaced, claimed atomically ------------------------------------------


@pytest.fixture
def rollout_args(tmp_path) -> list[str]:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle moving left on a black background\n")
    return ["--out", str(tmp_path / "out"), "--config_path", "tiny", "--data_path", str(prompts), "--seconds", "1",
            "--device", "cpu", "--segments", "3"]


METHOD = "a=:video.window_frames=6"
README_LAYOUT = {"scores.json", "videos/a/000-0.mp4", "videos/a/config.yaml", "videos/a/prompts.json"}


@pytest.mark.parametrize("name", ["..", ".", ".hidden", "x\\y"])
def test_rollout_method_names_cannot_leave_their_folder(tmp_path, rollout_args, capsys, monkeypatch, name):
    forbid(monkeypatch, rollout_program, "build_codec")
    assert rollout_program.main(rollout_args + ["--method", f"{name}=:video.window_frames=6"]) == 2
    assert "a plain folder name" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def test_rollout_outputs_are_where_readme_says_and_replaced_only_with_overwrite(tmp_path, rollout_args, capsys,
                                                                                monkeypatch):
    out = tmp_path / "out"
    assert rollout_program.main(rollout_args + ["--method", METHOD]) == 0
    capsys.readouterr()
    first = files(out)
    assert set(first) == README_LAYOUT  # nothing in --out itself but scores.json, no temporary left
    forbid(monkeypatch, rollout_program, "build_codec")
    assert rollout_program.main(rollout_args + ["--method", METHOD, "--seed", "1"]) == 2
    assert "already exists (and 3 more" in one_error_line(capsys.readouterr().err) and files(out) == first
    monkeypatch.undo()
    assert rollout_program.main(rollout_args + ["--method", METHOD, "--seed", "1", "--overwrite"]) == 0
    capsys.readouterr()
    second = files(out)
    assert set(second) == README_LAYOUT and second["videos/a/000-0.mp4"] != first["videos/a/000-0.mp4"]
    # a video this run does not write would be scored as method a: refused even with --overwrite
    (out / "videos" / "a" / "old-0.mp4").write_bytes(second["videos/a/000-0.mp4"])
    forbid(monkeypatch, rollout_program, "build_codec")
    assert rollout_program.main(rollout_args + ["--method", METHOD, "--overwrite"]) == 2
    assert "old-0.mp4 is not one of this run's videos" in one_error_line(capsys.readouterr().err)


def test_rollout_stops_before_generating_when_another_run_claims_its_method(tmp_path, rollout_args, capsys,
                                                                            monkeypatch):
    # Another run writes videos/a/config.yaml between this run's checks and its claim of the folder.
    check = rollout_program.check_outputs

    def racing_check(methods, prompts, args, out):
        check(methods, prompts, args, out)
        (out / "videos" / "a").mkdir(parents=True)
        (out / "videos" / "a" / "config.yaml").write_text("the other run's")

    monkeypatch.setattr(rollout_program, "check_outputs", racing_check)
    forbid(monkeypatch, rollout_program, "build_codec")
    assert rollout_program.main(rollout_args + ["--method", METHOD]) == 2
    assert "appeared while this run was writing it" in one_error_line(capsys.readouterr().err)
    assert files(tmp_path / "out") == {"videos/a/config.yaml": b"the other run's"}


def test_rollout_never_replaces_a_video_another_run_published_meanwhile(tmp_path, rollout_args, capsys, monkeypatch):
    render = rollout_program.render

    def racing_render(codec, cfg, blocks, paths, *rest):
        (paths[0].parent.parent / paths[0].name).write_bytes(b"the other run's video")  # its final name
        return render(codec, cfg, blocks, paths, *rest)

    monkeypatch.setattr(rollout_program, "render", racing_render)
    assert rollout_program.main(rollout_args + ["--method", METHOD]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]  # after progress
    assert len(errors) == 1 and "000-0.mp4 appeared while this run was writing it" in errors[0]
    got = files(tmp_path / "out")  # theirs kept, no scores, no temporary folder left
    assert set(got) == {"videos/a/000-0.mp4", "videos/a/config.yaml"}
    assert got["videos/a/000-0.mp4"] == b"the other run's video"
    assert not list((tmp_path / "out" / "videos" / "a").glob(".rollout-*"))


def test_two_rollouts_into_one_folder_at_once_one_wins_the_other_stops(tmp_path, rollout_args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "eval.rollout", *rollout_args, "--method", METHOD]
    procs = [subprocess.Popen([*cmd, "--seed", str(seed)], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for seed in (0, 1)]
    try:
        results = [(p.wait(timeout=120), p.stderr.read()) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert sorted(rc for rc, _ in results) == [0, 2], results
    loser = next(err for rc, err in results if rc == 2)
    assert "already exists" in loser or "appeared while this run was writing it" in loser
    assert set(files(tmp_path / "out")) == README_LAYOUT


@pytest.mark.parametrize("extra,message", [
    (["--segments", "1"], "--segments=1: give 2 to 9"),
    (["--segments", "50"], "--segments=50: give 2 to 9"),  # more segments than the video has frames
    (["--weights", "/nonexistent/weights"], "--weights /nonexistent/weights is not a folder"),
    (["--device", "gpu"], "--device 'gpu' is not a device"),
])
def test_rollout_refuses_what_scoring_would_refuse_before_generating(rollout_args, capsys, monkeypatch, extra,
                                                                     message):
    forbid(monkeypatch, rollout_program, "build_codec")
    assert rollout_program.main(rollout_args + ["--method", METHOD, *extra]) == 2
    assert message in one_error_line(capsys.readouterr().err)


def test_rollout_out_must_be_a_folder(tmp_path, rollout_args, capsys, monkeypatch):
    (tmp_path / "out").write_text("a file")
    forbid(monkeypatch, rollout_program, "build_codec")
    assert rollout_program.main(rollout_args + ["--method", METHOD]) == 2
    assert "is a file: give a folder" in one_error_line(capsys.readouterr().err)


def test_publish_never_replaces_a_file_even_without_hard_links(tmp_path, monkeypatch):
    def make(name: str, text: str) -> Path:
        (tmp_path / name).write_text(text)
        return tmp_path / name

    taken = make("taken", "theirs")
    with pytest.raises(OSError, match="appeared while"):
        publish(make("tmp", "ours"), taken, overwrite=False)
    monkeypatch.setattr(os, "link", lambda *a: (_ for _ in ()).throw(PermissionError(1, "no hard links")))
    with pytest.raises(OSError, match="appeared while"):
        publish(tmp_path / "tmp", taken, overwrite=False)
    assert taken.read_text() == "theirs"
    publish(tmp_path / "tmp", tmp_path / "free", overwrite=False)
    assert (tmp_path / "free").read_text() == "ours" and not (tmp_path / "tmp").exists()
    publish(make("tmp", "ours"), taken, overwrite=True)
    assert taken.read_text() == "ours"


# -- the other programs of eval/ ----------------------------------------------------------------------------------


def test_toy_videos_never_replace_references_without_overwrite(videos, capsys):
    before = files(videos)
    args = ["--out", str(videos), "--num_videos", "1", "--seconds", "1", "--size", "32"]
    assert toy_videos.main([*args, "--fade", "0.9"]) == 2
    assert "already exists" in one_error_line(capsys.readouterr().err) and files(videos) == before
    assert toy_videos.main([*args, "--fade", "0.9", "--overwrite"]) == 0
    assert files(videos)["faded/000-0.mp4"] != before["faded/000-0.mp4"]


@pytest.mark.parametrize("spoil,message", [
    (lambda run: (run / "scores.json").write_text("{broken"), "scores.json is not valid JSON"),
    (lambda run: (run / "scores.json").write_text('{"rows": []}'), "scores.json lacks segments"),
    (lambda run: (run / "videos" / "faded" / "000-0.mp4").unlink(), "listed in"),
])
def test_report_names_a_bad_scores_file_or_a_missing_video(tmp_path, videos, capsys, monkeypatch, spoil, message):
    run = videos.parent
    assert drift_program.main(["--videos", str(videos), "--out", str(run / "scores.json")]) == 0
    capsys.readouterr()
    spoil(run)
    forbid(monkeypatch, report, "plot_metrics")
    assert report_program.main([str(run)]) == 2
    assert message in one_error_line(capsys.readouterr().err)


def test_vbench_clips_refuse_a_bad_video_or_length_before_cutting(tmp_path, videos, capsys, monkeypatch):
    forbid(monkeypatch, vbench, "write_video")
    assert vbench.main(["clips", "--videos", str(videos), "--out", str(tmp_path / "c"), "--clip_seconds", "0"]) == 2
    assert "--clip_seconds=0.0: give a positive length" in one_error_line(capsys.readouterr().err)
    (videos / "truth" / "zz.mp4").write_text("not a video")
    assert vbench.main(["clips", "--videos", str(videos), "--out", str(tmp_path / "c")]) == 2
    assert "zz.mp4 is not a readable video" in one_error_line(capsys.readouterr().err)


def test_toy_fidelity_names_a_missing_checkpoint(tmp_path, capsys):
    assert toy_fidelity.cli(["--checkpoint", str(tmp_path / "none.safetensors"), "--out", str(tmp_path / "f")]) == 2
    assert "none.safetensors does not exist" in one_error_line(capsys.readouterr().err)


def test_toy_results_stops_when_the_report_fails_and_reruns_its_rollouts(tmp_path, monkeypatch):
    (tmp_path / "runs" / "hiar").mkdir(parents=True)
    (tmp_path / "runs" / "hiar" / "model.safetensors").write_bytes(b"")
    seen = {}

    def run_program(program: str, *args: str) -> int:
        seen[program] = args
        if program == "toy_fidelity":  # what the program writes into its --out
            out = Path(args[args.index("--out") + 1])
            out.mkdir(parents=True)
            (out / "results.json").write_text(json.dumps({"colour_fidelity": 1.0, "moving": 1.0}))
        return 2 if program == "report" else 0

    monkeypatch.setattr(toy_results, "run_program", run_program)
    assert toy_results.main(["--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "res"),
                             "--doc", str(tmp_path / "doc.md"), "--num_long", "1"]) == 2
    assert "--overwrite" in seen["rollout"]  # its --out is its own: regenerated on every run
    assert not (tmp_path / "doc.md").exists()


def test_toy_results_resume_keeps_only_the_measurements_it_would_repeat(tmp_path, monkeypatch):
    """An evaluation stopped after its fidelity measurements (here: by a failing report) continues with
    --resume without measuring them again; a retrained checkpoint, another clip count or no --resume
    measures again. The measurements are written by eval.toy_fidelity's own main, sampling stubbed."""
    import numpy as np

    checkpoint = tmp_path / "runs" / "hiar" / "model.safetensors"
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_bytes(b"")
    per_set = {"colour": 1.0, "shape": 0.5, "direction": 0.5, "direction_of_moving": 0.5, "count": 1.0,
               "presence": 1.0, "presence_by_segment": [1.0], "direction_by_segment": [0.5], "objects": 2,
               "colour_fidelity": 1.0, "moving": 0.5,
               "direction_by_scene": dict.fromkeys(("one_object", "two_same_way", "two_ways", "other_objects_way"),
                                                   0.5)}

    def sample(checkpoint, overrides, sampler, num_clips, *rest):
        sets = {name: {**per_set, "clips": num_clips} for name in toy_results.CAPTION_SETS}
        return {**sets["template"], "by_captions": sets}, [np.zeros((6, 8, 8, 3), np.uint8)]

    monkeypatch.setattr(toy_fidelity, "evaluate", sample)
    measured, report_fails = [], True

    def run_program(program: str, *args: str) -> int:
        if program == "toy_fidelity":
            measured.append(args[args.index("--out") + 1])
            toy_fidelity.main(list(args))
        elif program == "rollout":
            (tmp_path / "res" / "long" / "plots").mkdir(parents=True, exist_ok=True)
        elif program == "report":
            if report_fails:
                return 2
            long = tmp_path / "res" / "long"
            for name in ("plots/metrics.png", "plots/contact_sheet.png"):
                (long / name).write_bytes(b"")
            (long / "report.md").write_text("# Drift report\n")
            scores = {"methods": {"hiar": {"summary": {"drift_score": 0.1, "slope": {}}}}}
            (long / "scores.json").write_text(json.dumps(scores))
        return 0

    monkeypatch.setattr(toy_results, "run_program", run_program)
    common = ["--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "res"), "--doc", str(tmp_path / "doc.md"),
              "--fidelity_seconds", "60", "300", "--label", "1x", "model.patch_size=[1,1,1]"]
    assert toy_results.main(common) == 2 and len(measured) == 3  # short clips, 60 s, 300 s; then the report fails
    report_fails = False
    measured.clear()
    assert toy_results.main([*common, "--resume"]) == 0 and measured == []
    assert "| hiar | 300 s | held_out |" in (tmp_path / "doc.md").read_text()
    assert toy_results.main([*common, "--resume", "--fidelity_clips", "2"]) == 0
    assert [Path(m).parent.name for m in measured] == ["60s", "300s"]  # the short clips' count did not change
    measured.clear()
    (tmp_path / "res" / "fidelity" / "60s" / "hiar" / "results.json").write_text("{")  # damaged: measured again
    assert toy_results.main([*common, "--resume", "--fidelity_clips", "2"]) == 0
    assert [Path(m).parent.name for m in measured] == ["60s"]
    measured.clear()
    os.utime(checkpoint, (time.time() + 10, time.time() + 10))  # retrained after the measurements
    assert toy_results.main([*common, "--resume", "--fidelity_clips", "2"]) == 0 and len(measured) == 3
    measured.clear()
    assert toy_results.main([*common, "--fidelity_clips", "2"]) == 0 and len(measured) == 3  # no --resume


def test_toy_results_measures_the_weights_it_is_given_where_a_run_has_them(tmp_path, monkeypatch):
    """--weights selected.safetensors (launch/reproduce_toy.sh SELECT): a run with that file is measured and
    rolled out at it, a run without it (the ODE initialisation) at its model.safetensors."""
    for run in ("hiar", "ode_init"):
        (tmp_path / "runs" / run).mkdir(parents=True)
        (tmp_path / "runs" / run / "model.safetensors").write_bytes(b"")
    (tmp_path / "runs" / "hiar" / "selected.safetensors").write_bytes(b"")
    measured, rolled = [], []

    def run_program(program: str, *args: str) -> int:
        if program == "toy_fidelity":
            measured.append(args[args.index("--checkpoint") + 1])
            out = Path(args[args.index("--out") + 1])
            out.mkdir(parents=True, exist_ok=True)
            (out / "results.json").write_text("{}")
            return 0
        rolled.extend(a.split("=", 2)[2] for a in args if a.startswith("--method="))
        return 2  # the rollouts fail: the evaluation ends there

    monkeypatch.setattr(toy_results, "run_program", run_program)
    assert toy_results.main(["--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "res"), "--fidelity_seconds",
                             "--weights", "selected.safetensors"]) == 2
    runs = tmp_path / "runs"
    assert measured == [str(runs / "hiar" / "selected.safetensors"), str(runs / "ode_init" / "model.safetensors")]
    assert [m.split(":")[0] for m in rolled] == measured


def test_toy_results_runs_each_program_as_its_own_process(tmp_path, capfd, monkeypatch):
    monkeypatch.chdir(tmp_path)  # found from any folder
    assert toy_results.run_program("report", str(tmp_path / "missing")) == 2  # python -m eval.report's exit code
    assert "scores.json does not exist" in one_error_line(capfd.readouterr().err)


def test_bench_refuses_an_unwritable_result_before_running(tmp_path, capsys, monkeypatch):
    forbid(monkeypatch, bench, "bench")
    assert bench.main(["run", "--json", str(tmp_path)]) == 2
    assert "is a folder" in one_error_line(capsys.readouterr().err)
    assert bench.main(["table", str(tmp_path / "missing.json")]) == 2
    assert "missing.json is not a readable result file" in one_error_line(capsys.readouterr().err)


# -- a pipeline stage stopped by SIGTERM ---------------------------------------------------------------------------


def stage(store: dist.Store, rank: int, world: int) -> StageGroup:
    """A StageGroup's failure bookkeeping on an in-process store, without a process group."""
    group = object.__new__(StageGroup)
    group.rank, group.world, group._store = rank, world, store
    return group


def test_sigterm_blames_a_dead_stage_else_itself_else_nobody_known():
    host = socket.gethostname()
    child = subprocess.Popen([sys.executable, "-c", ""])
    deadline = time.time() + 30
    while psutil.Process(child.pid).status() != psutil.STATUS_ZOMBIE and time.time() < deadline:
        time.sleep(0.05)
    assert not _alive(child.pid)  # dead, not yet reaped
    child.wait()
    store = dist.HashStore()
    for rank, pid in ((0, os.getpid()), (1, os.getppid()), (2, child.pid)):
        store.set(PID_KEY.format(rank), f"{host} {pid}")
    assert stage(store, 0, 3)._sigterm_cause() == "rank 2 (its process ended)"
    assert stage(store, 0, 2)._sigterm_cause() == "rank 0 (it was sent SIGTERM)"  # everyone else lives
    assert stage(store, 0, 4)._sigterm_cause() == "rank 2 (its process ended)"  # rank 3 unknown, 2 dead
    store.set(PID_KEY.format(2), f"other-host {os.getpid()}")
    assert stage(store, 0, 3)._sigterm_cause() == "another stage (see the launcher summary)"
    with pytest.raises(PipelineError, match=r"pipeline stage 0 stopped: rank 0 \(it was sent SIGTERM\) failed"):
        stage(store, 0, 2)._on_sigterm(signal.SIGTERM, None)  # recorded for the others
    with pytest.raises(PipelineError, match=r"pipeline stage 1 stopped: rank 0 \(it was sent SIGTERM\) failed"):
        stage(store, 1, 3)._on_sigterm(signal.SIGTERM, None)  # the first cause recorded wins


class SignalledStore:
    """A store whose next `check` is interrupted by a SIGTERM to this process, as torchrun's stop of the
    other workers can arrive while a stage reads the recorded cause."""

    def __init__(self, store: dist.Store):
        self._store, self.armed = store, True

    def check(self, keys):
        found = self._store.check(keys)
        if self.armed:
            self.armed = False
            os.kill(os.getpid(), signal.SIGTERM)  # the handler runs before this returns
        return found

    def __getattr__(self, name):
        return getattr(self._store, name)


def test_a_sigterm_during_the_read_of_the_cause_still_names_the_recorded_cause():
    # Stage 1 sees rank 0's connection close and reads the cause rank 0 recorded; torchrun's SIGTERM lands
    # mid-read. Its handler's error carries the recorded cause and must not be taken for a store failure
    # (which would blame "its connection closed" instead: a CI flake of the test below, 2026-12-06).
    store = dist.HashStore()
    store.set(FAILED_KEY, "rank 0 (it was sent SIGTERM)")
    group = stage(SignalledStore(store), 1, 2)
    previous = signal.signal(signal.SIGTERM, group._on_sigterm)
    try:
        err = group.fail(RuntimeError("Connection closed by peer"), peer=0)
    except PipelineError as raised:
        err = raised
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert str(err) == "pipeline stage 1 stopped: rank 0 (it was sent SIGTERM) failed"


def torchrun_pipeline(folder: Path) -> subprocess.Popen:
    """A 2-stage pipeline long enough to be running when a stage is stopped; gloo on loopback only."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "GLOO_SOCKET_IFNAME": "lo"}
    args = ["--config_path", "tiny", "--prompt", "a red circle", "--num_output_frames", "3000", "--seed", "1",
            "--inference_method", "timestep_first", "--parallel", "pipeline", "--output_folder", str(folder)]
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(ROOT / "inference.py"), *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def stage_process(proc: subprocess.Popen, rank: int, started: Path, timeout: float) -> psutil.Process:
    """The inference.py process of `rank` (not its ffmpeg child, which inherits RANK), once `started` exists."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for child in psutil.Process(proc.pid).children(recursive=True):
            try:
                if (started.exists() and child.environ().get("RANK") == str(rank)
                        and "inference.py" in " ".join(child.cmdline())):
                    return child
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        time.sleep(0.3)
    raise AssertionError("the pipeline never started")


@pytest.mark.parametrize("victim", [0, 1])
def test_a_sigtermed_stage_is_named_by_the_others(tmp_path, victim):
    proc = torchrun_pipeline(tmp_path)
    try:
        process = stage_process(proc, victim, tmp_path / "config.yaml", timeout=90)
        time.sleep(2)  # inside the generation
        process.send_signal(signal.SIGTERM)
        start = time.time()
        out, _ = proc.communicate(timeout=60)
        took = time.time() - start
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the session this test started
            proc.communicate()
    other = 1 - victim
    assert proc.returncode != 0 and took < 30
    assert f"pipeline stage {other} stopped: rank {victim} (it was sent SIGTERM) failed" in out, out[-3000:]
    assert f"pipeline stage {victim} stopped: rank {victim} (it was sent SIGTERM) failed" in out, out[-3000:]
