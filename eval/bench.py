"""Inference benchmark: every order of the (block, step) cells measured side by side in one run.

    python -m eval.bench run --config_path configs/toy/hiar.yaml --num_blocks 40 --stages 2 --long_factor 10 \\
        --json runs/bench_toy_cpu.json
    python -m eval.bench run --config_path configs/hiar.yaml --device cuda --num_blocks 7    # Wan2.1-1.3B, 21 frames
    python -m eval.bench table runs/bench_toy_cpu.json                                        # print a result again
    python -m eval.bench pipeline --num_blocks 100 --stages 2     # = run --methods wavefront --stages 2 (issue 5)

Rows (random weights, which do not change speed; latents only, no VAE decode):
* one per method: frame_first; step_major and wavefront (timestep_first); fused (step-major with
  `sampling.fused`); hybrid (hybrid_block0, wavefront);
* `pipeline_N` with `--stages N`: the step-first video from a torchrun pipeline of N processes
  (forwards and memory are its last stage's);
* `wavefront_xF` with `--long_factor F`: the wavefront order over F times as many blocks (memory).

Every row runs in a fresh process (on the CPU pinned to `--threads` cores of its own): a 2-block
warm-up, then `--repeats` rollouts. The first rollout gives the model forwards (`SamplerStats`) and
the peak memory; per block wall-clock, frames/s and first-block latency are medians over all of
them. Memory: on CUDA the caching allocator's peak allocation, on the CPU the peak resident set
(Linux VmHWM, reset before the rollout through /proc/self/clear_refs); `growth` is that peak minus
what was resident before the rollout. Step-major rows are also profiled: one more rollout with a
device synchronisation around every forward gives per-forward timings and the seconds of every cell,
from which the makespan of a pipeline of each stage count is simulated (`pipeline_makespan`): one
GPU cannot run 4 stages, but its cells tell what 4 would do.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.util
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

from hiar.atomic import atomic_path
from hiar.config import Config, load_config
from hiar.distributed import local_rank_device
from hiar.models import WanModel
from hiar.outputs import exit_code
from hiar.parallel import StageGroup, pipeline_stage, stage_steps
from hiar.sampling import CellRunner, SamplerStats, block_noise, generate

ROOT = Path(__file__).resolve().parent.parent
METHODS = {
    "frame_first": ["sampling.method=frame_first", "sampling.fused=false"],
    "step_major": ["sampling.method=timestep_first", "sampling.schedule=step_major", "sampling.fused=false"],
    "wavefront": ["sampling.method=timestep_first", "sampling.schedule=wavefront", "sampling.fused=false"],
    "fused": ["sampling.method=timestep_first", "sampling.schedule=step_major", "sampling.fused=true"],
    "hybrid": ["sampling.method=hybrid_block0", "sampling.schedule=wavefront", "sampling.fused=false"],
}
TARGETS = {  # the CPU targets: (comparison, goal)
    "pipeline_speedup": (">=", 0.9),  # x the number of stages: 1.8x with 2
    "fused_time_vs_frame_first": ("<=", 1.25),
    "long_rollout_memory_ratio": ("<=", 1.1),
}


# -- measuring one row (in its own process) -------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(config_path: str, method: str, overrides: list[str], device: torch.device):
    cfg = load_config(config_path, [*overrides, *METHODS[method]])
    torch.manual_seed(0)
    with device:  # initialise where it runs: a 1.3B model is slow to initialise on the CPU
        model = WanModel(cfg.model)
    model = model.to(dtype=cfg.torch_dtype(device)).eval()
    text = torch.randn(1, cfg.model.text_len, cfg.model.text_dim, generator=torch.Generator().manual_seed(0))
    return cfg, model, text.to(device, cfg.torch_dtype(device))


def rollout(model: WanModel, text: torch.Tensor, cfg: Config, num_blocks: int, device: torch.device,
            group: StageGroup | None, stats: SamplerStats | None = None, on_cell=None) -> list[float]:
    """Seconds from the start to each block this process finishes (none on a pipeline's inner stages)."""
    noise = block_noise(cfg, 0, [0], device)
    if group is None:
        blocks = generate(model, text, cfg, noise, num_blocks, stats, on_cell)
    else:
        group.barrier()
        blocks = pipeline_stage(CellRunner(model, text, cfg, noise, stats, on_cell), group, num_blocks)
    sync(device)
    start, done = time.perf_counter(), []
    for _ in blocks:
        sync(device)
        done.append(time.perf_counter() - start)
    return done


def _proc_status(field: str) -> int:
    """A memory field of /proc/self/status in bytes."""
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE).group(1)) * 1024


@contextlib.contextmanager
def peak_memory(device: torch.device):
    """Peak memory inside the block -> {'peak_bytes', 'growth_bytes'} (growth: peak - memory at entry)."""
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        base = _proc_status("VmRSS")
    result: dict[str, int] = {}
    yield result
    sync(device)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else _proc_status("VmHWM")
    result.update(peak_bytes=peak, growth_bytes=peak - base)


def pipeline_makespan(cell_s: list[list[float]], stages: int) -> float:
    """Seconds a pipeline of `stages` processes takes for cells that took cell_s[j][n] seconds (step j,
    block n) on one device. Stage r runs its steps (`stage_steps`) of block n once it is done with block
    n - 1 and stage r - 1 is done with block n; transfers cost nothing."""
    groups = stage_steps(len(cell_s), stages)
    done = [0.0] * stages  # when each stage finished its latest block
    for n in range(len(cell_s[0])):
        ready = 0.0  # when block n arrives at the stage
        for r, steps in enumerate(groups):
            done[r] = max(done[r], ready) + sum(cell_s[j][n] for j in steps)
            ready = done[r]
    return done[-1]


def profile_cells(model: WanModel, text: torch.Tensor, cfg: Config, num_blocks: int, device: torch.device) -> dict:
    """One step-major rollout synchronised around every forward: median milliseconds of each kind of
    forward, seconds of every cell [S][N], and the simulated pipeline makespan for each stage count."""
    k, forwards, cells, clock = cfg.video.frames_per_block, defaultdict(list), [], {}

    def before(module, args):
        sync(device)
        clock["forward"] = time.perf_counter()

    def after(module, args, output):  # args: (x [B, F, C, h, w], t, prompt, Cached)
        sync(device)
        kind = "fused" if args[0].shape[1] > k else "write" if args[3].write_frames else "denoise"
        forwards[kind].append(time.perf_counter() - clock["forward"])

    def on_cell():
        sync(device)
        clock["cell"], start = time.perf_counter(), clock["cell"]
        cells.append(clock["cell"] - start)

    hooks = [model.register_forward_pre_hook(before), model.register_forward_hook(after)]
    try:
        clock["cell"] = time.perf_counter()
        rollout(model, text, cfg, num_blocks, device, None, on_cell=on_cell)
    finally:
        for hook in hooks:
            hook.remove()
    cell_s = [cells[j * num_blocks:(j + 1) * num_blocks] for j in range(len(cells) // num_blocks)]
    return {"forward_ms": {kind: 1000 * statistics.median(s) for kind, s in forwards.items()},
            "forward_counts": {kind: len(s) for kind, s in forwards.items()}, "cell_s": cell_s,
            "simulated_pipeline_s": {r: pipeline_makespan(cell_s, r) for r in range(1, len(cell_s) + 1)}}


def pin(index: int, threads: int) -> None:
    """`threads` threads on `threads` cores of this process's own: processes do not share a core."""
    torch.set_num_threads(threads)
    cores = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cores[(index * threads + i) % len(cores)] for i in range(threads)})


def worker(args: argparse.Namespace) -> None:
    """One row, in this process or, under torchrun, as one pipeline stage; the last stage writes `args.out`."""
    device = local_rank_device(args.device)
    if device.type == "cpu":
        pin(int(os.environ.get("LOCAL_RANK", 0)), args.threads)
    cfg, model, text = build(args.config_path, args.method, args.overrides, device)
    group = StageGroup(len(cfg.schedule.denoising_steps)) if int(os.environ.get("WORLD_SIZE", 1)) > 1 else None
    stats = SamplerStats()
    with torch.no_grad():
        rollout(model, text, cfg, 2, device, group)  # warm-up
        with peak_memory(device) as memory:
            runs = [rollout(model, text, cfg, args.num_blocks, device, group, stats)]
        runs += [rollout(model, text, cfg, args.num_blocks, device, group) for _ in range(args.repeats - 1)]
        profiled = group is None and cfg.sampling.method == "timestep_first" and cfg.sampling.schedule == "step_major"
        profile = profile_cells(model, text, cfg, args.num_blocks, device) if profiled else None
    if group is None or group.is_last:
        row = summarize(cfg, args.num_blocks, runs, stats, memory)
        row.update(method=args.method, overrides=METHODS[args.method], stages=group.world if group else 1,
                   profile=profile)
        Path(args.out).write_text(json.dumps(row))
    if group is not None:
        group.close()


def summarize(cfg: Config, num_blocks: int, runs: list[list[float]], stats: SamplerStats, memory: dict) -> dict:
    totals = [run[-1] for run in runs]
    per_block = [t / num_blocks for t in totals]
    frames = num_blocks * cfg.video.frames_per_block
    video_frames = (frames - 1) * cfg.video.vae_stride[0] + 1  # the codec's first frame is not stretched
    seconds = statistics.median(totals)
    return {"num_blocks": num_blocks, "latent_frames": frames, "video_frames": video_frames, "repeats": len(runs),
            "forwards": stats.forwards, "forwards_per_block": statistics.median(stats.per_block.values()),
            "model_frames_per_block": stats.frames / num_blocks,
            "block_s": {"median": statistics.median(per_block), "min": min(per_block), "max": max(per_block)},
            "runs_s": totals, "fps": frames / seconds, "video_fps": video_frames / seconds,
            "first_block_s": statistics.median(run[0] for run in runs), **memory}


# -- the run: rows side by side, ratios, targets ----------------------------------------------------


def run_row(args: argparse.Namespace, method: str, num_blocks: int, repeats: int, stages: int = 1) -> dict:
    launcher = [] if stages == 1 else ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={stages}"]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "row.json"
        cmd = [sys.executable, *launcher, "-m", "eval.bench", "worker", "--method", method, "--config_path",
               args.config_path, "--num_blocks", str(num_blocks), "--repeats", str(repeats), "--device", args.device,
               "--threads", str(args.threads), "--out", str(out), *args.overrides]
        subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)}, check=True)
        return json.loads(out.read_text())


def machine(device: str) -> dict:
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(torch.device(device))
    else:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        name = re.search(r"model name\s*:\s*(.*)", cpuinfo).group(1) if "model name" in cpuinfo else platform.processor()
    return {"device": name, "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "flash_attn": importlib.util.find_spec("flash_attn") is not None, "load_average_start": os.getloadavg()}


def check(name: str, value: float, stages: int = 1) -> dict:
    op, goal = TARGETS[name]
    goal *= stages
    return {"value": value, "goal": f"{op} {goal:g}", "met": value >= goal if op == ">=" else value <= goal}


def targets(rows: dict, stages: int, long_factor: int) -> dict:
    """The issue's targets for the rows this run has."""
    def block_s(name):
        return rows[name]["block_s"]["median"]

    out = {}
    if "wavefront" in rows and f"pipeline_{stages}" in rows:
        speedup = block_s("wavefront") / block_s(f"pipeline_{stages}")
        out["pipeline_speedup"] = check("pipeline_speedup", speedup, stages)
    if "fused" in rows and "frame_first" in rows:
        out["fused_time_vs_frame_first"] = check("fused_time_vs_frame_first", block_s("fused") / block_s("frame_first"))
    if "wavefront" in rows and f"wavefront_x{long_factor}" in rows:
        ratio = rows[f"wavefront_x{long_factor}"]["growth_bytes"] / rows["wavefront"]["growth_bytes"]
        out["long_rollout_memory_ratio"] = check("long_rollout_memory_ratio", ratio)
    return out


def bench(args: argparse.Namespace) -> dict:
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    info = machine(args.device)
    rows = {m: run_row(args, m, args.num_blocks, args.repeats) for m in args.methods}
    if args.stages > 1:
        rows[f"pipeline_{args.stages}"] = run_row(args, "wavefront", args.num_blocks, args.repeats, args.stages)
    if args.long_factor > 1:
        rows[f"wavefront_x{args.long_factor}"] = run_row(args, "wavefront", args.num_blocks * args.long_factor, 1)
    base = rows.get("frame_first")
    for row in rows.values():
        row["time_vs_frame_first"] = row["block_s"]["median"] / base["block_s"]["median"] if base else None
        row["growth_vs_frame_first"] = row["growth_bytes"] / base["growth_bytes"] if base else None
    info["load_average_end"] = os.getloadavg()
    return {"command": " ".join(["python -m eval.bench", *args.argv]), "date": started, "machine": info,
            "config_path": args.config_path, "overrides": args.overrides, "num_blocks": args.num_blocks,
            "threads_per_process": args.threads, "rows": rows,
            "targets": targets(rows, args.stages, args.long_factor)}


def table(result: dict) -> str:
    """The result as markdown: one line per row, then the profiles and the targets."""
    mib = 2**20
    lines = ["| row | blocks | forwards / block | model calls | ms / block, median [min-max] | latent frames/s | "
             "video frames/s | first block (s) | rollout memory (MiB) | peak memory (MiB) | time vs frame_first |",
             "| --- " * 11 + "|"]
    for name, r in result["rows"].items():
        b = r["block_s"]
        ratio = f"{r['time_vs_frame_first']:.2f}x" if r["time_vs_frame_first"] else "-"
        lines.append(f"| {name} | {r['num_blocks']} | {r['forwards_per_block']:g} | {r['forwards']} | "
                     f"{1000 * b['median']:.1f} [{1000 * b['min']:.1f}-{1000 * b['max']:.1f}] | {r['fps']:.1f} | "
                     f"{r['video_fps']:.1f} | {r['first_block_s']:.3f} | {r['growth_bytes'] / mib:.1f} | "
                     f"{r['peak_bytes'] / mib:.0f} | {ratio} |")
    lines.append("")
    for name, r in result["rows"].items():
        if r["profile"]:
            p = r["profile"]
            forwards = ", ".join(f"{kind} {ms:.2f} ms" for kind, ms in p["forward_ms"].items())
            sim = ", ".join(f"{s} stage{'s' if int(s) > 1 else ''} {t:.2f} s ({r['latent_frames'] / t:.1f} frames/s)"
                            for s, t in p["simulated_pipeline_s"].items())
            lines.append(f"* {name}: per forward {forwards}; simulated pipeline makespan: {sim}")
    for name, t in result["targets"].items():
        lines.append(f"* target {name}: {t['value']:.2f} (goal {t['goal']}): {'met' if t['met'] else 'NOT met'}")
    return "\n".join(lines)


def json_target(path: Path) -> None:
    """Refuse a --json that cannot be written before the benchmark (minutes), not after it."""
    if path.is_dir():
        raise ValueError(f"--json {path} is a folder: name the result file, e.g. {path / 'bench.json'}")
    if not os.access(next(p for p in path.absolute().parents if p.exists()), os.W_OK):
        raise ValueError(f"--json {path}: its folder cannot be written; choose a writable path")


def read_result(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not a readable result file ({err}): give the --json a run wrote") from None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("run", "pipeline", "worker"):
        s = sub.add_parser(name)
        s.add_argument("--config_path", default="configs/toy/hiar.yaml")
        s.add_argument("--num_blocks", type=int, default=100 if name == "pipeline" else 40)
        s.add_argument("--repeats", type=int, default=5)
        s.add_argument("--device", default="cpu")
        s.add_argument("--threads", type=int, default=1, help="CPU threads (and cores) per process")
        s.add_argument("overrides", nargs="*", metavar="section.key=value")
        if name == "worker":
            s.add_argument("--method", choices=list(METHODS), required=True)
            s.add_argument("--out", required=True)
            continue
        s.add_argument("--stages", type=int, default=2 if name == "pipeline" else 1,
                       help="also run the step-first video as a torchrun pipeline of this many processes")
        s.add_argument("--json", help="also write the result here")
        if name == "run":
            s.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
            s.add_argument("--long_factor", type=int, default=1,
                           help="also run the wavefront order over this many times the blocks (memory)")
        else:
            s.set_defaults(methods=["wavefront"], long_factor=1)
    table_parser = sub.add_parser("table", help="print the markdown table of a result file")
    table_parser.add_argument("result")
    args = p.parse_args(argv)
    if args.command == "worker":
        worker(args)
        return 0
    if args.command == "table":
        return exit_code(lambda: print(table(read_result(Path(args.result)))))
    if args.json and exit_code(lambda: json_target(Path(args.json))):
        return 2
    args.argv = argv
    result = bench(args)
    print(table(result))
    if args.json:
        with atomic_path(args.json) as tmp:  # a result a long run produced is never left half-written
            tmp.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
