"""Inference benchmark: every order of the (block, step) cells measured side by side in one run.

    python -m eval.bench run --config_path configs/toy/hiar.yaml --num_blocks 40 --stages 2 --long_factor 10 \\
        --json runs/bench_toy_cpu.json
    python -m eval.bench run --config_path configs/hiar.yaml --device cuda --num_blocks 7    # Wan2.1-1.3B, 21 frames
    python -m eval.bench table runs/bench_toy_cpu.json                                        # print a result again
    python -m eval.bench pipeline --num_blocks 100 --stages 2     # = run --methods wavefront --stages 2 (issue 5)
    python -m eval.bench quality runtime.fp8_linear=emulate       # what an option costs in output, toy default

Rows (random weights, which do not change speed; latents only, no VAE decode, unless an option decodes):
* one per method: frame_first; step_major and wavefront (timestep_first); fused (step-major with
  `sampling.fused`); hybrid (hybrid_block0, wavefront); hybrid_steps_K (the first K steps of every
  block block-first, K = 1..3);
* `METHOD+OPTION` with `--options` (for each of `--option_methods`): the method with one speed option,
  compared with the method's own row (`time_vs_base`): static (runtime.kv_cache=static), compiled
  (runtime.compile_blocks), fp8 and fp8_compiled (runtime.fp8_linear=torchao, without and with
  compile_blocks), decode and decode_overlap (the codec decodes every block through hiar.stream.Stream,
  inline or overlapped with the next block's generation; a random Wan VAE at Wan geometry), and
  `backends`: one row per attention backend (model.attention_backend) that runs on this device and
  dtype. A row that cannot run here is listed under `skipped` with the reason;
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

`quality` runs a checkpoint (the toy default) with and without overrides (a speed option: fp8 linears,
bf16) from the same noise and prompts, on the CPU, and reports how far the option moves its output: one
forward's predicted flow at each of the student's timesteps, and each block of a rollout with SDE
stepping (the default) and with ODE stepping (no fresh noise, so differences do not decorrelate the
samples), as relative L2 errors ||option - plain|| / ||plain||.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
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
import typing
from collections import defaultdict
from pathlib import Path

import torch

from hiar.atomic import atomic_path
from hiar.codecs import Codec, ToyDCTCodec, WanVAE
from hiar.checkpoints import load_generator
from hiar.config import Config, ModelConfig, load_config, repo_path, with_overrides
from hiar.data import load_prompts
from hiar.distributed import local_rank_device
from hiar.fp8 import FP8Unavailable, check_torchao, fp8_linears
from hiar.models import WanModel
from hiar.models.attention import AttentionBackendError, check_attention_backend
from hiar.outputs import exit_code
from hiar.parallel import StageGroup, pipeline_stage, stage_steps
from hiar.sampling import CellRunner, SamplerStats, block_noise, generate, sample_video
from hiar.stream import Stream
from hiar.text import build_text_encoder

ROOT = Path(__file__).resolve().parent.parent
METHODS = {
    "frame_first": ["sampling.method=frame_first", "sampling.fused=false"],
    "step_major": ["sampling.method=timestep_first", "sampling.schedule=step_major", "sampling.fused=false"],
    "wavefront": ["sampling.method=timestep_first", "sampling.schedule=wavefront", "sampling.fused=false"],
    "fused": ["sampling.method=timestep_first", "sampling.schedule=step_major", "sampling.fused=true"],
    "hybrid": ["sampling.method=hybrid_block0", "sampling.schedule=wavefront", "sampling.fused=false"],
    **{f"hybrid_steps_{k}": ["sampling.method=hybrid_steps", f"sampling.frame_first_steps={k}",
                             "sampling.schedule=wavefront", "sampling.fused=false"] for k in (1, 2, 3)},
}
# model.attention_backend's choices but "auto" (which is one of them)
BACKENDS = [b for b in typing.get_args(typing.get_type_hints(ModelConfig)["attention_backend"]) if b != "auto"]
# --options: row suffix -> (overrides on top of the method's, how the blocks are decoded)
OPTIONS = {
    "static": (["runtime.kv_cache=static"], "none"),
    "compiled": (["runtime.compile_blocks=true"], "none"),
    "fp8": (["runtime.fp8_linear=torchao"], "none"),
    "fp8_compiled": (["runtime.fp8_linear=torchao", "runtime.compile_blocks=true"], "none"),
    "decode": ([], "inline"),
    "decode_overlap": ([], "overlap"),
    **{backend: ([f"model.attention_backend={backend}"], "none") for backend in BACKENDS},
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
    fp8_linears(model, cfg.runtime.fp8_linear)
    text = torch.randn(1, cfg.model.text_len, cfg.model.text_dim, generator=torch.Generator().manual_seed(0))
    return cfg, model, text.to(device, cfg.torch_dtype(device))


def random_codec(cfg: Config, device: torch.device) -> Codec:
    """The config's codec; the Wan VAE with random weights (they do not change its speed either)."""
    if cfg.video.codec == "toy_dct":
        return ToyDCTCodec()
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    with device:
        vae = AutoencoderKLWan()  # diffusers' defaults are Wan2.1's VAE
    return WanVAE(vae.to(dtype=cfg.torch_dtype(device)))


def rollout(model: WanModel, text: torch.Tensor, cfg: Config, num_blocks: int, device: torch.device,
            group: StageGroup | None, stats: SamplerStats | None = None, on_cell=None,
            codec: Codec | None = None, overlap: bool = False) -> list[float]:
    """Seconds from the start to each block this process finishes (none on a pipeline's inner stages);
    with `codec`, to each block decoded (`overlap`: while the next block is generated)."""
    noise = block_noise(cfg, 0, [0], device)
    if group is None:
        blocks = generate(model, text, cfg, noise, num_blocks, stats, on_cell)
    else:
        group.barrier()
        blocks = pipeline_stage(CellRunner(model, text, cfg, noise, stats, on_cell), group, num_blocks)
    if codec is not None:
        blocks = Stream(blocks, codec, overlap=overlap)
    sync(device)
    start, done = time.perf_counter(), []
    for _ in blocks:
        # The stream the blocks arrive on, not the device: an overlapped decode of the next block may
        # still run on its side stream, and waiting for it here would undo the overlap.
        if device.type == "cuda":
            torch.cuda.current_stream(device).synchronize()
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
    decode = {"codec": random_codec(cfg, device), "overlap": args.decode == "overlap"} if args.decode != "none" else {}
    with torch.no_grad():
        rollout(model, text, cfg, 2, device, group, **decode)  # warm-up
        with peak_memory(device) as memory:
            runs = [rollout(model, text, cfg, args.num_blocks, device, group, stats, **decode)]
        runs += [rollout(model, text, cfg, args.num_blocks, device, group, **decode) for _ in range(args.repeats - 1)]
        profiled = group is None and cfg.sampling.method == "timestep_first" and cfg.sampling.schedule == "step_major"
        profile = profile_cells(model, text, cfg, args.num_blocks, device) if profiled else None
    if group is None or group.is_last:
        row = summarize(cfg, args.num_blocks, runs, stats, memory)
        row.update(method=args.method, overrides=[*METHODS[args.method], *args.overrides],
                   stages=group.world if group else 1, profile=profile, decode=args.decode)
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


def run_row(args: argparse.Namespace, method: str, num_blocks: int, repeats: int, stages: int = 1,
            option: str | None = None) -> dict:
    launcher = [] if stages == 1 else ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={stages}"]
    extra, decode = OPTIONS[option] if option else ([], "none")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "row.json"
        cmd = [sys.executable, *launcher, "-m", "eval.bench", "worker", "--method", method, "--config_path",
               args.config_path, "--num_blocks", str(num_blocks), "--repeats", str(repeats), "--device", args.device,
               "--threads", str(args.threads), "--decode", decode, "--out", str(out), *args.overrides, *extra]
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


def unavailable(args: argparse.Namespace, option: str) -> str | None:
    """Why the option rows of `option` cannot run on this machine, or None when they can."""
    cfg = load_config(args.config_path, args.overrides)
    device = torch.device(args.device)
    extra, decode = OPTIONS[option]
    try:
        if option in BACKENDS:
            check_attention_backend(option, device, cfg.torch_dtype(device), cfg.model.head_dim)
        if "runtime.fp8_linear=torchao" in extra:
            check_torchao(device)
    except (AttentionBackendError, FP8Unavailable) as err:
        return str(err)
    if decode != "none" and cfg.video.codec == "wan_vae" and importlib.util.find_spec("diffusers") is None:
        return "the Wan VAE needs diffusers, which is not installed"
    return None


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


def bench(args: argparse.Namespace, on_row=None) -> dict:
    """Every row of the run, one process each; `on_row(result so far)` after each row (a run stopped
    from outside keeps the rows it finished; `complete` says whether it got through)."""
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    info = machine(args.device)
    plan = [(m, dict(method=m, num_blocks=args.num_blocks, repeats=args.repeats)) for m in args.methods]
    skipped = {}
    for option in [o for name in args.options for o in (BACKENDS if name == "backends" else [name])]:
        why = unavailable(args, option)
        for method in args.option_methods:
            if why is None:
                plan.append((f"{method}+{option}", dict(method=method, num_blocks=args.num_blocks,
                                                         repeats=args.repeats, option=option)))
            else:
                skipped[f"{method}+{option}"] = why
    if args.stages > 1:
        plan.append((f"pipeline_{args.stages}", dict(method="wavefront", num_blocks=args.num_blocks,
                                                     repeats=args.repeats, stages=args.stages)))
    if args.long_factor > 1:
        plan.append((f"wavefront_x{args.long_factor}", dict(method="wavefront",
                                                            num_blocks=args.num_blocks * args.long_factor, repeats=1)))
    rows: dict = {}
    for name, spec in plan:
        rows[name] = run_row(args, **spec)
        if "option" in spec:
            rows[name]["option"] = spec["option"]
        result = summary(args, started, info, rows, skipped, complete=len(rows) == len(plan))
        if on_row is not None:
            on_row(result)
    return result


def summary(args: argparse.Namespace, started: str, info: dict, rows: dict, skipped: dict, complete: bool) -> dict:
    """The result of the rows measured so far: ratios between them and the targets they allow."""
    base = rows.get("frame_first")
    for name, row in rows.items():
        row["time_vs_frame_first"] = row["block_s"]["median"] / base["block_s"]["median"] if base else None
        row["growth_vs_frame_first"] = row["growth_bytes"] / base["growth_bytes"] if base else None
        own = rows.get(name.split("+")[0]) if "+" in name else None  # an option row's method without it
        row["time_vs_base"] = row["block_s"]["median"] / own["block_s"]["median"] if own else None
    info = {**info, "load_average_end": os.getloadavg()}
    return {"command": " ".join(["python -m eval.bench", *args.argv]), "date": started, "machine": info,
            "config_path": args.config_path, "overrides": args.overrides, "num_blocks": args.num_blocks,
            "threads_per_process": args.threads, "rows": rows, "skipped": skipped, "complete": complete,
            "targets": targets(rows, args.stages, args.long_factor)}


def relative_error(option: torch.Tensor, plain: torch.Tensor) -> float:
    return float((option.float() - plain.float()).norm() / plain.float().norm())


def quality(checkpoint: str, overrides: list[str], num_blocks: int) -> dict:
    """How far `overrides` move the output of `checkpoint` (module docstring), on the CPU."""
    model, plain_cfg = load_generator(checkpoint)
    model.eval()
    cfg = with_overrides(plain_cfg, overrides)
    device = torch.device("cpu")
    option = copy.deepcopy(model).to(cfg.torch_dtype(device))
    fp8_linears(option, cfg.runtime.fp8_linear)
    prompts = load_prompts(repo_path(cfg.runtime.prompts))
    text = build_text_encoder(plain_cfg)(prompts)
    samples = range(len(prompts))
    result = {"checkpoint": checkpoint, "overrides": overrides, "prompts": prompts, "forward": {}, "rollout": {}}
    with torch.no_grad():
        x = block_noise(plain_cfg, 0, samples).initial(0)  # [B, k, C, h, w] at t_0
        for t in plain_cfg.schedule.timesteps:
            dtype = cfg.torch_dtype(device)
            result["forward"][f"{t:g}"] = relative_error(option(x.to(dtype), t, text.to(dtype)), model(x, t, text))
        for stepping in ("sde", "ode"):
            videos = []
            for m, c in ((model, plain_cfg), (option, cfg)):
                c = with_overrides(c, [f"sampling.stepping={stepping}"])
                noise = block_noise(c, 0, samples)
                noise.dtype = c.torch_dtype(device)
                videos.append(sample_video(m, text.to(noise.dtype), c, noise, num_blocks))
            k = plain_cfg.video.frames_per_block
            result["rollout"][stepping] = [relative_error(videos[1][:, n * k:(n + 1) * k], videos[0][:, n * k:(n + 1) * k])
                                           for n in range(num_blocks)]
    return result


def quality_lines(result: dict) -> str:
    forward = ", ".join(f"t={t} {e:.4f}" for t, e in result["forward"].items())
    lines = [f"{' '.join(result['overrides']) or '(no overrides)'} against the plain run, relative L2 error:",
             f"* one forward's flow: {forward}"]
    for stepping, errors in result["rollout"].items():
        lines.append(f"* rollout, {stepping} stepping, block by block: " + " ".join(f"{e:.3f}" for e in errors))
    return "\n".join(lines)


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
    against = [f"{name} {r['time_vs_base']:.2f}x" for name, r in result["rows"].items() if r.get("time_vs_base")]
    if against:
        lines.append(f"* time of each option row against its method's row: {', '.join(against)}")
    if not result.get("complete", True):
        lines.append("* incomplete: the run stopped before its last rows; these are the rows it finished")
    for name, why in result.get("skipped", {}).items():
        lines.append(f"* {name}: not run ({why})")
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
            s.add_argument("--decode", choices=["none", "inline", "overlap"], default="none")
            s.add_argument("--out", required=True)
            continue
        s.add_argument("--stages", type=int, default=2 if name == "pipeline" else 1,
                       help="also run the step-first video as a torchrun pipeline of this many processes")
        s.add_argument("--json", help="also write the result here")
        if name == "run":
            s.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
            s.add_argument("--long_factor", type=int, default=1,
                           help="also run the wavefront order over this many times the blocks (memory)")
            s.add_argument("--options", nargs="+", choices=[*OPTIONS, "backends"], default=[],
                           help="also run each of --option_methods with each of these speed options")
            s.add_argument("--option_methods", nargs="+", choices=list(METHODS), default=["frame_first", "wavefront"])
        else:
            s.set_defaults(methods=["wavefront"], long_factor=1, options=[], option_methods=[])
    table_parser = sub.add_parser("table", help="print the markdown table of a result file")
    table_parser.add_argument("result")
    q = sub.add_parser("quality", help="how far overrides (a speed option) move a checkpoint's output, on the CPU")
    q.add_argument("--checkpoint", default="checkpoints/toy_hiar.safetensors")
    q.add_argument("--num_blocks", type=int, default=7)
    q.add_argument("--json", help="also write the result here")
    q.add_argument("overrides", nargs="*", metavar="section.key=value")
    args = p.parse_args(argv)
    if args.command == "quality":
        if args.json and exit_code(lambda: json_target(Path(args.json))):
            return 2
        result = quality(args.checkpoint, args.overrides, args.num_blocks)
        print(quality_lines(result))
        if args.json:
            with atomic_path(args.json) as tmp:
                tmp.write_text(json.dumps(result, indent=2) + "\n")
        return 0
    if args.command == "worker":
        worker(args)
        return 0
    if args.command == "table":
        return exit_code(lambda: print(table(read_result(Path(args.result)))))
    if args.json and exit_code(lambda: json_target(Path(args.json))):
        return 2
    args.argv = argv

    def save(result: dict) -> None:
        with atomic_path(args.json) as tmp:  # a result a long run produced is never left half-written
            tmp.write_text(json.dumps(result, indent=2) + "\n")

    print(table(bench(args, save if args.json else None)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
