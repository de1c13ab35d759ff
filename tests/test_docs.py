"""The documentation tells the truth about the repository: every path it (and the code) names exists,
every markdown link resolves, the README's commands call programs that exist with flags they accept,
the README's module map names every module, and no document cites files users do not have."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Folders that are not the repository's text: virtual environments, caches, and what programs write.
SKIP_DIRS = {"__pycache__", "outputs", "runs", "wan_models", "ckpts"}  # and every hidden folder (.git, .venv*)
SCANNED = (".py", ".md", ".sh", ".yaml", ".yml")
# A repository path: one of the repository's top-level folders, then path characters; it counts when it
# ends in a file extension or "/" (so "tests/test_*.py" or "runs/eval/long" are not taken for one).
PREFIXES = ("hiar", "eval", "train", "docs", "configs", "launch", "scripts", "tests", "data", "checkpoints")
REPO_PATH = re.compile(r"(?<![\w./~$-])(?:%s)/[\w./-]*" % "|".join(PREFIXES))

# Paths that are named but are no file of this repository, each with its reason; keep both short
# (test_allowlists_are_used fails on an entry nobody names any more).
RUN_TIME = {  # made or fetched when a program runs
    "checkpoints/step-N/": "a training run folder's checkpoints (hiar/runs.py)",
    "checkpoints/step-N/model/mp_rank_00_model_states.pt": "DeepSpeed's file in such a checkpoint",
    "data/vidprom_filtered_extended.txt": "fetched by launch/download_weights.sh (git-ignored)",
    "hiar/stage_pid/": "a key of torch.distributed's store (hiar/parallel.py), not a file",
}
ELSEWHERE = {  # files of other repositories, cited by their own paths
    "checkpoints/ode_init.pt": "huggingface.co/gdhe17/Self-Forcing (downloaded into ckpts/self_forcing/)",
    "scripts/generate_ode_pairs.py": "github.com/Jacky-hate/HiAR, the reference implementation",
    "configs/clip_length_mix.yaml": "github.com/Vchitect/VBench (VBench-Long)",
    "scripts/constant.py": "github.com/Vchitect/VBench (the leaderboard's scores)",
    "scripts/cal_final_score.py": "github.com/Vchitect/VBench (the leaderboard's scores)",
}
NOT_IN_REPO = RUN_TIME.keys() | ELSEWHERE.keys()


def text_files(suffixes=SCANNED) -> list[Path]:
    found = []
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.startswith(".")
                         and not d.endswith(".egg-info"))
        found += [Path(folder) / f for f in sorted(files) if f.endswith(suffixes)]
    return found


def repo_paths(text: str):
    """(line number, path) of every token of `text` that looks like a repository path."""
    for m in REPO_PATH.finditer(text):
        token = m.group(0).rstrip(".")
        if token.endswith("/") or re.search(r"\.[A-Za-z0-9]{1,10}$", token):
            yield text.count("\n", 0, m.start()) + 1, token


def test_every_repository_path_named_in_code_and_docs_exists():
    missing = [f"{path.relative_to(ROOT)}:{line}: {token}"
               for path in text_files() for line, token in repo_paths(path.read_text(errors="replace"))
               if token not in NOT_IN_REPO and not (ROOT / token).exists()]
    assert not missing, "paths named but missing:\n" + "\n".join(missing)


def test_allowlists_are_used():
    named = {token for path in text_files() for _, token in repo_paths(path.read_text(errors="replace"))}
    assert NOT_IN_REPO <= named, f"no longer named anywhere, drop them: {NOT_IN_REPO - named}"


def test_the_path_scan_finds_a_broken_reference():
    absent = "docs/" + "no_such_file.md"  # spelled in two pieces so that this file names no missing path
    text = f"see docs/benchmarks.md and {absent}; configs/toy/*.yaml; runs/eval/long; $out/x.json\n"
    assert [t for _, t in repo_paths(text)] == ["docs/benchmarks.md", absent, "configs/toy/"]
    assert not (ROOT / absent).exists()


def test_every_markdown_link_resolves():
    broken = []
    for path in text_files((".md",)):
        for m in re.finditer(r"\]\(([^)\s]+)\)", path.read_text()):
            target = m.group(1)
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue  # a URL or an anchor in the same file
            if not (path.parent / target.split("#")[0]).exists():
                broken.append(f"{path.relative_to(ROOT)}: {target}")
    assert not broken, "markdown links to missing files:\n" + "\n".join(broken)


def test_no_document_cites_files_users_do_not_have():
    for path in text_files((".md",)):  # README.md, docs/ and every other document
        text = path.read_text()
        for name in ("DESIGN.md", "STYLE.md", "../shared", "KINDS.md"):
            assert name not in text, f"{path.relative_to(ROOT)} cites {name}"


def test_readme_module_map_names_every_module():
    readme = (ROOT / "README.md").read_text()
    modules = [p for folder in ("hiar", "hiar/models", "train", "eval", "scripts") for p in (ROOT / folder).glob("*.py")
               if not p.name.startswith("__")]
    modules += [*(ROOT / "launch").glob("*.sh"), *(ROOT / "launch").glob("*.py")]
    unnamed = [str(p.relative_to(ROOT)) for p in sorted(modules) if str(p.relative_to(ROOT)) not in readme]
    assert not unnamed, f"README's module map misses: {unnamed}"


def test_docs_index_lists_every_document():
    index = (ROOT / "docs" / "README.md").read_text()
    docs = [p.relative_to(ROOT / "docs").as_posix() for p in (ROOT / "docs").rglob("*.md")]
    # a document's generated artefacts (report.md of a run, in a folder named after the document) are not documents
    documents = [d for d in docs if d != "README.md" and not (ROOT / "docs" / d).parent.joinpath(
        "summary.json").exists()]
    unlisted = [d for d in sorted(documents) if f"]({d})" not in index]
    assert not unlisted, f"docs/README.md does not list: {unlisted}"


# -- the README's commands --------------------------------------------------------------------------------------

COMMAND_DOCS = ["README.md", "docs/inference.md", "docs/training.md"]
PYTHONS = {"python", "python3", ".venv/bin/python"}
LAUNCHERS = {"torchrun", ".venv/bin/torchrun", "deepspeed", ".venv/bin/deepspeed"}


def bash_commands(markdown: str) -> list[list[str]]:
    """Each command line of the fenced bash blocks, as words (continuations joined, comments dropped)."""
    commands = []
    for block in re.findall(r"^```(?:bash|sh|shell)\n(.*?)^```", markdown, flags=re.M | re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"(^|\s)#.*", "", line)  # a comment (no documented command quotes a '#')
            for part in re.split(r"&&|;", line):
                words = shlex.split(part, comments=True)
                while words and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]):
                    words = words[1:]  # VAR=value before the command
                if words:
                    commands.append(words)
    return commands


def program_of(words: list[str]) -> tuple[str, str, list[str]] | None:
    """("module" | "script" | "bash", target, its arguments), or None for a command we do not check."""
    if words[0] in PYTHONS and len(words) > 2 and words[1] == "-m":
        if words[2] != "torch.distributed.run":
            return "module", words[2], words[3:]
        words = ["torchrun", *words[3:]]
    if words[0] in PYTHONS and len(words) > 1:
        return "script", words[1], words[2:]
    if words[0] in LAUNCHERS:
        script = next((i for i, w in enumerate(words) if w.endswith(".py")), None)  # launcher flags come first
        return None if script is None else ("script", words[script], words[script + 1:])
    if words[0] == "bash" and len(words) > 1:
        return "bash", words[1], words[2:]
    return None


# Launch scripts that hand their arguments to a program: (the program, whether it comes first in them).
PASSES_TO = {"launch/demo.sh": ("inference.py", False), "launch/pipeline.sh": ("inference.py", False),
             "launch/train.sh": (None, True)}


def programs_of(words: list[str]) -> list[tuple[str, str, list[str]]]:
    """The command's program, and the program a launch script runs with the command's arguments."""
    program = program_of(words)
    if program is None:
        return []
    kind, target, args = program
    if kind == "bash" and target in PASSES_TO:
        inner, first = PASSES_TO[target]
        if first and args and args[0].endswith(".py"):
            return [program, ("script", args[0], args[1:])]
        if inner:
            return [program, ("script", inner, args)]
    return [program]


def module_file(module: str) -> Path:
    base = ROOT.joinpath(*module.split("."))
    return base.with_suffix(".py") if base.with_suffix(".py").exists() else base / "__main__.py"


# Runs each program's --help in one process (one torch import for all of them), with the words before
# the first flag in front (a subcommand such as `eval.bench run`), and prints {key: help text}.
HELP_DRIVER = r"""
import contextlib, io, json, runpy, sys
out = {}
for key, kind, target, words in json.loads(sys.argv[1]):
    buffer = io.StringIO()
    sys.argv = [target, *words, "--help"]
    with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
        try:
            if kind == "module":
                runpy.run_module(target, run_name="__main__", alter_sys=True)
            else:
                runpy.run_path(target, run_name="__main__")
        except SystemExit:
            pass
        except BaseException as e:
            buffer.write(f"\nFAILED: {type(e).__name__}: {e}")
    out[key] = buffer.getvalue()
print("\n@@HELP@@" + json.dumps(out))
"""


@pytest.fixture(scope="module")
def documented_commands():
    commands = []
    for doc in COMMAND_DOCS:
        for words in bash_commands((ROOT / doc).read_text()):
            for program in programs_of(words):
                commands.append((doc, " ".join(words), *program))
    return commands


def test_readme_has_the_commands_a_newcomer_needs(documented_commands):
    readme = {(kind, target) for doc, _, kind, target, _ in documented_commands if doc == "README.md"}
    for needed in [("bash", "launch/test.sh"), ("script", "inference.py"), ("bash", "launch/download_weights.sh"),
                   ("script", "scripts/pipeline_parallel_inference.py"), ("bash", "launch/reproduce_toy.sh"),
                   ("script", "train/distill.py"), ("module", "eval.rollout"), ("module", "eval.report")]:
        assert needed in readme, needed
    text = (ROOT / "README.md").read_text()
    assert "--data_path data/prompts.txt" in text  # the published-weights example names its prompts


def test_documented_commands_call_programs_that_accept_their_flags(documented_commands):
    checks, problems = {}, []
    for doc, line, kind, target, args in documented_commands:
        if kind == "bash":
            script = ROOT / target
            if not script.is_file():
                problems.append(f"{doc}: `{line}`: no {target}")
                continue
            proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
            if proc.returncode:
                problems.append(f"{doc}: {target} does not parse: {proc.stderr.strip()}")
            continue
        path = module_file(target) if kind == "module" else ROOT / target
        if not path.is_file():
            problems.append(f"{doc}: `{line}`: no {path.relative_to(ROOT)}")
            continue
        lead = []
        for word in args:
            if word.startswith("-") or "=" in word:
                break
            lead.append(word)
        flags = {a.split("=")[0] for a in args if a.startswith("--")}
        checks.setdefault((kind, target, tuple(lead)), []).append((doc, line, flags))
    keys = {f"{i}": (kind, target, list(lead)) for i, (kind, target, lead) in enumerate(checks)}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", HELP_DRIVER,
                           json.dumps([[k, *v] for k, v in keys.items()])],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert "@@HELP@@" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]
    helps = json.loads(proc.stdout.rsplit("@@HELP@@", 1)[1])
    for key, (kind, target, lead) in keys.items():
        text = helps[key]
        if "usage:" not in text or "FAILED:" in text:
            problems.append(f"`{target} {' '.join(lead)} --help` printed no usage:\n{text[-1500:]}")
            continue
        for doc, line, flags in checks[(kind, target, tuple(lead))]:
            for flag in sorted(flags):
                if not re.search(r"(?<![\w-])%s(?![\w-])" % re.escape(flag), text):
                    problems.append(f"{doc}: `{line}`: {target} does not accept {flag}")
    assert not problems, "\n".join(problems)


def test_the_command_parser_reads_readme_lines():
    md = ("```bash\nNPROC=4 bash launch/pipeline.sh --prompt \"a b\"   # note\n"
          "python -m torch.distributed.run --standalone --nproc_per_node=2 inference.py --parallel pipeline \\\n"
          "    --num_output_frames 9\ndeepspeed --num_gpus 1 train/distill.py --config_path x.yaml\n```\n")
    programs = [program_of(w) for w in bash_commands(md)]
    assert programs == [("bash", "launch/pipeline.sh", ["--prompt", "a b"]),
                        ("script", "inference.py", ["--parallel", "pipeline", "--num_output_frames", "9"]),
                        ("script", "train/distill.py", ["--config_path", "x.yaml"])]
