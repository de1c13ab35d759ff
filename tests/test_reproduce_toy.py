"""launch/reproduce_toy.sh's plumbing, run in a copy of the repository's layout whose .venv/bin/python is a
stand-in: it records each command and writes the file the stage is checked by, so the test sees which
stages run, with which paths and overrides, in seconds. What the stages compute is tested elsewhere."""

import hashlib
import os
import shlex
import shutil
import subprocess
from pathlib import Path

from hiar.config import load_config

ROOT = Path(__file__).resolve().parent.parent

# Records its arguments; answers the script's config query (train.steps, train.decay_steps); a training
# stage notes whether it found a checkpoint to resume from and writes its model, checkpoint and metrics
# under train.output_dir, the ODE pairs their manifest.
STAND_IN = r"""#!/usr/bin/env bash
case $1 in -c) echo "400 0"; exit;; esac
echo "$*" >> "$COMMANDS"
echo "${OMP_NUM_THREADS:-unset} $1 $2" >> "$COMMANDS.threads"
if [ "$1" = -m ]; then  # an evaluation program: --export writes the chosen weights
  for a in "$@"; do [ "${prev:-}" = --export ] && touch "$a"; prev=$a; done; exit
fi
for a in "$@"; do case $a in train.output_dir=*) out=${a#*=};; ode.output_dir=*) pairs=${a#*=};; esac; done
if [ "$1" = train/ode_pairs.py ]; then mkdir -p "$pairs" && touch "$pairs/manifest.json"; exit; fi
if [ -e "$out/checkpoints/latest" ]; then echo "$out" >> "$COMMANDS.resumed"; fi
mkdir -p "$out/checkpoints/step-00000001" && touch "$out/model.safetensors" "$out/metrics.jsonl"
echo step-00000001 > "$out/checkpoints/latest"
"""


def layout(tmp_path: Path) -> Path:
    """The script, launch/env.sh and what env.sh hashes, with a stand-in .venv it takes as up to date."""
    repo = tmp_path / "repo"
    (repo / "launch").mkdir(parents=True)
    for name in ("launch/reproduce_toy.sh", "launch/env.sh", "requirements.txt", "pyproject.toml"):
        (repo / name).write_bytes((ROOT / name).read_bytes())
    (repo / ".venv" / "bin").mkdir(parents=True)
    (repo / ".venv" / "bin" / "python").write_text(STAND_IN)
    (repo / ".venv" / "bin" / "python").chmod(0o755)
    digest = hashlib.sha256((ROOT / "requirements.txt").read_bytes() + (ROOT / "pyproject.toml").read_bytes())
    (repo / ".venv" / ".requirements.sha256").write_text(digest.hexdigest() + "\n")
    return repo


def reproduce(repo: Path, **env: str) -> list[list[str]]:
    """One run of the script: the commands it gave python, each split into words."""
    log = repo / "commands.txt"
    log.unlink(missing_ok=True)
    (repo / "commands.txt.resumed").unlink(missing_ok=True)
    proc = subprocess.run(["bash", "launch/reproduce_toy.sh"], cwd=repo, capture_output=True, text=True, timeout=60,
                          env={"PATH": os.environ["PATH"], "COMMANDS": str(log), "VARIANTS": "hiar self_forcing",
                               "JOBS": "1", **env})
    assert proc.returncode == 0, proc.stderr
    return [shlex.split(line) for line in log.read_text().splitlines()]


def stage(commands: list[list[str]], program: str) -> list[list[str]]:
    return [c for c in commands if c[0] == program]


def settings(words: list[str]) -> dict[str, str]:
    return dict(w.split("=", 1) for w in words if "=" in w and not w.startswith("--"))


def test_every_stage_reads_and_writes_under_root_with_the_overrides(tmp_path):
    repo = layout(tmp_path)
    extra = ["model.patch_size=[1,1,1]", "train.seed=7"]
    commands = reproduce(repo, ROOT="runs/p1", OVERRIDES=" ".join(extra))
    trained = [c for c in commands if c[0].startswith("train/")]
    assert [c[0] for c in trained] == ["train/teacher.py"] * 3 + ["train/ode_pairs.py", "train/ode_init.py",
                                                                  "train/distill.py", "train/distill.py"]
    for command in trained:
        assert command[-len(extra):] == extra, command
        paths = [v for k, v in settings(command).items()
                 if k.endswith(("output_dir", "teacher", "critic", "generator", "init_weights"))]
        assert paths and all(p.startswith("runs/p1/") for p in paths), command
    # the teacher's three runs (the last one's is shipped): each starts from the one before, the last
    # resuming where it finished
    assert [settings(c).get("train.init_weights") for c in trained[:3]] == [
        None, "runs/p1/teacher/model.safetensors", "runs/p1/teacher_further/model.safetensors"]
    assert (repo / "commands.txt.resumed").read_text().splitlines() == ["runs/p1/teacher_long"]
    hiar = settings(stage(commands, "train/distill.py")[0])
    assert hiar == {**hiar, "train.output_dir": "runs/p1/hiar", "ode.output_dir": "runs/p1/ode_pairs",
                    "distill.generator": "runs/p1/ode_init/model.safetensors",
                    "distill.teacher": "runs/p1/teacher_long/model.safetensors",
                    "distill.critic": "runs/p1/teacher_long/model.safetensors"}
    (evaluation,) = [c for c in commands if c[:2] == ["-m", "eval.toy_results"]]
    assert evaluation[evaluation.index("--runs") + 1] == "runs/p1" and evaluation[-len(extra):] == extra
    timings = (repo / "runs/p1/timings.tsv").read_text()
    assert [line.split("\t")[1] for line in timings.splitlines()] == [
        "teacher", "teacher_further", "teacher_long", "ode_pairs", "ode_init", "hiar (1x)", "self_forcing (1x)",
        "evaluation (1x)", "whole script (1x)"]
    assert not (repo / "runs/toy").exists()

    # 10x continues each variant from its 1x run under the same root; nothing before it runs again
    commands = reproduce(repo, ROOT="runs/p1", OVERRIDES=" ".join(extra), SCALE="10")
    assert [c[0] for c in commands if c[0].startswith("train/")] == ["train/distill.py"] * 2
    assert (repo / "commands.txt.resumed").read_text().splitlines() == ["runs/p1/x10/hiar", "runs/p1/x10/self_forcing"]
    assert settings(stage(commands, "train/distill.py")[0])["train.output_dir"] == "runs/p1/x10/hiar"


def test_without_root_every_stage_gets_its_configs_own_paths(tmp_path):
    """ROOT and OVERRIDES unset: the paths the script passes are those its presets already name."""
    commands = reproduce(layout(tmp_path))
    for command in (c for c in commands if c[0].startswith("train/")):
        config = load_config(ROOT / command[command.index("--config_path") + 1])
        for key, value in settings(command).items():
            if key != "train.steps":
                section, name = key.split(".")
                assert str(getattr(getattr(config, section), name)) == value, (command[0], key)
    assert (tmp_path / "repo/runs/toy/timings.tsv").is_file()


def test_a_given_teacher_replaces_the_teacher_stage(tmp_path):
    """TEACHER=FILE (the shipped teacher): no teacher is trained, and every later stage reads FILE; a FILE
    that does not exist stops the script before any stage."""
    repo = layout(tmp_path)
    (repo / "shipped.safetensors").touch()
    commands = reproduce(repo, TEACHER="shipped.safetensors")
    trained = [c for c in commands if c[0].startswith("train/")]
    assert [c[0] for c in trained] == ["train/ode_pairs.py", "train/ode_init.py", "train/distill.py",
                                       "train/distill.py"]
    assert settings(trained[0])["ode.teacher"] == "shipped.safetensors"
    assert {settings(trained[2])[k] for k in ("distill.teacher", "distill.critic")} == {"shipped.safetensors"}
    assert not (repo / "runs/toy/teacher").exists()
    proc = subprocess.run(["bash", "launch/reproduce_toy.sh"], cwd=repo, capture_output=True, text=True, timeout=60,
                          env={"PATH": os.environ["PATH"], "COMMANDS": str(repo / "none.txt"), "TEACHER": "missing"})
    assert proc.returncode == 2 and "TEACHER=missing: no such file" in proc.stderr
    assert not (repo / "none.txt").exists()


def test_select_keeps_every_checkpoint_chooses_among_them_and_evaluates_the_choice(tmp_path):
    """SELECT=N: each variant trains keeping a checkpoint every N iterations, eval.toy_select chooses each
    one's into selected.safetensors (once: a rerun keeps the choice), and the evaluation measures those
    weights into results_chosen and its own section of docs/results.md."""
    repo = layout(tmp_path)
    commands = reproduce(repo, SELECT="50")
    for command in stage(commands, "train/distill.py"):
        assert settings(command) == {**settings(command), "train.save_every": "50", "train.keep_checkpoints": "0"}
    chosen = [c for c in commands if c[:2] == ["-m", "eval.toy_select"]]
    assert [(c[c.index("--run") + 1], c[c.index("--every") + 1], c[c.index("--export") + 1]) for c in chosen] == [
        ("runs/toy/hiar", "50", "runs/toy/hiar/selected.safetensors"),
        ("runs/toy/self_forcing", "50", "runs/toy/self_forcing/selected.safetensors")]
    (evaluation,) = [c for c in commands if c[:2] == ["-m", "eval.toy_results"]]
    flags = {evaluation[i]: evaluation[i + 1] for i in range(2, len(evaluation) - 1) if evaluation[i].startswith("--")}
    assert flags == {**flags, "--weights": "selected.safetensors", "--label": "1x-chosen",
                     "--out": "runs/toy/results_chosen"}
    rerun = reproduce(repo, SELECT="50")
    assert not [c for c in rerun if c[:2] == ["-m", "eval.toy_select"] or c[0].startswith("train/")]
    plain = reproduce(repo)  # without SELECT: the runs' own weights, as before
    (evaluation,) = [c for c in plain if c[:2] == ["-m", "eval.toy_results"]]
    assert "--weights" not in evaluation and evaluation[evaluation.index("--out") + 1] == "runs/toy/results"


def test_the_evaluation_gets_the_callers_thread_setting_back(tmp_path):
    """Variants trained side by side (JOBS=2) get their share of the cores each, and the choice and the
    evaluation after them the caller's OMP_NUM_THREADS (one thread beside another run), or none when the
    caller set none."""
    repo = layout(tmp_path)
    threads = repo / "commands.txt.threads"
    for caller, expected in (({"OMP_NUM_THREADS": "3"}, "3"), ({}, "unset")):
        threads.unlink(missing_ok=True)
        for variant in ("hiar", "self_forcing"):  # trained again: the trainings are where the setting changes
            shutil.rmtree(repo / "runs" / "toy" / variant, ignore_errors=True)
        reproduce(repo, JOBS="2", SELECT="50", **caller)
        lines = [line.split() for line in threads.read_text().splitlines()]
        trained = [t for t, program, _ in lines if program == "train/distill.py"]
        evaluated = [t for t, program, name in lines
                     if program == "-m" and name in ("eval.toy_select", "eval.toy_results")]
        assert len(trained) == 2 and trained[0] not in ("unset", "3")
        assert len(evaluated) == 3 and set(evaluated) == {expected}
