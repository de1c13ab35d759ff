"""The benchmark harness (eval/bench.py): the pipeline simulation's arithmetic, and a smoke run of every
row on the tiny preset checking forward counts and the fields of the JSON."""

import json

import pytest

import eval.bench as bench

S, N = 4, 4  # denoising steps of the tiny preset; blocks of the smoke run


@pytest.mark.parametrize("stages,makespan", [(1, 4 * 10), (2, 2 * (10 + 1)), (3, 2 * 10 + 2), (4, 10 + 3)])
def test_makespan_of_equal_cells(stages, makespan):
    # 10 blocks of 1 s cells: the slowest stage sets the rate, the others add their fill time.
    assert bench.pipeline_makespan([[1.0] * 10] * S, stages) == makespan


def test_makespan_waits_for_the_slow_step():
    cells = [[1.0] * 5, [1.0] * 5, [3.0] * 5, [1.0] * 5]  # step 2 takes 3 s a block
    # block 0 reaches stage 2 at 2 s, which then finishes a block every 3 s; stage 3 adds 1 s.
    assert bench.pipeline_makespan(cells, 4) == 2 + 3 * 5 + 1
    assert bench.pipeline_makespan(cells, 2) == 2 * 1 + 5 * 4  # stage 1 (steps 2, 3) takes 4 s a block


def test_run_measures_every_row(tmp_path, capsys):
    out = tmp_path / "bench.json"
    bench.main(["run", "--config_path", "tiny", "--num_blocks", str(N), "--repeats", "2", "--stages", "2",
                "--long_factor", "2", "--json", str(out)])
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert list(rows) == [*bench.METHODS, "pipeline_2", "wavefront_x2"]

    # Forwards per block at S = 4 (SamplerStats): 5 block-first, 8 step-first, S fused; the final
    # block's cache writes never run.
    counts = {name: (r["forwards_per_block"], r["forwards"]) for name, r in rows.items()}
    assert counts["frame_first"] == (S + 1, (S + 1) * N - 1)
    assert counts["step_major"] == counts["wavefront"] == (2 * S, 2 * S * N - S)
    assert counts["fused"] == (S, S * N)
    assert counts["hybrid"][1] == S + 1 + 2 * S * (N - 1) - S  # block 0 frame-first, then step-first
    # hybrid_steps: K denoise forwards and one write a block against one cache, then S - K steps
    # step-first; never run: the final block's writes (one block-first, S - K step-first).
    for k in (1, 2, 3):
        assert counts[f"hybrid_steps_{k}"] == (2 * S - k + 1, N * (2 * S - k + 1) - 1 - (S - k))
    # The last of 2 stages runs 2 steps a block: 2 denoise forwards and 2 cache writes (none for the final block).
    assert counts["pipeline_2"] == (S, 2 * N + 2 * (N - 1))
    assert counts["wavefront_x2"] == (2 * S, 2 * S * 2 * N - S)

    for name, r in rows.items():
        assert r["repeats"] == (1 if name == "wavefront_x2" else 2) == len(r["runs_s"])
        assert 0 < r["first_block_s"] <= max(r["runs_s"]) and r["block_s"]["min"] <= r["block_s"]["median"]
        assert r["fps"] == pytest.approx(3 * r["num_blocks"] * r["repeats"] / sum(r["runs_s"]), rel=0.5)
        assert r["video_fps"] == r["fps"]  # the toy codec's temporal stride is 1
        assert r["peak_bytes"] > r["growth_bytes"] >= 0
        assert r["time_vs_frame_first"] > 0 and r["growth_vs_frame_first"] is not None
        assert (r["profile"] is not None) == (name in ("step_major", "fused"))

    # Profiles: per-forward timings of the forwards the stats counted; the one-stage simulation is
    # the sum of the cells, more stages take less.
    for name, kinds in (("step_major", {"denoise": S * N, "write": S * (N - 1)}),
                        ("fused", {"denoise": S, "fused": S * (N - 1)})):
        p = rows[name]["profile"]
        assert p["forward_counts"] == kinds and set(p["forward_ms"]) == set(kinds)
        sim = p["simulated_pipeline_s"]
        assert sim["1"] == pytest.approx(sum(map(sum, p["cell_s"])))
        assert sim["1"] > sim["2"] > sim["4"]

    assert set(result["targets"]) == set(bench.TARGETS) and result["complete"]
    assert {"date", "command", "machine", "threads_per_process"} <= set(result)
    printed = capsys.readouterr().out
    assert sum(line.startswith("| ") for line in printed.splitlines()) == 2 + len(rows)
    assert "target pipeline_speedup" in printed
    bench.main(["table", str(out)])
    assert capsys.readouterr().out.strip() == printed.strip()


def test_pipeline_command_is_the_wavefront_row_and_a_2_stage_pipeline(monkeypatch):
    seen = {}
    monkeypatch.setattr(bench, "bench", lambda args, on_row: seen.update(vars(args)) or {"rows": {}, "targets": {}})
    bench.main(["pipeline"])
    assert (seen["methods"], seen["stages"], seen["long_factor"], seen["num_blocks"]) == (["wavefront"], 2, 1, 100)


def test_video_frames_of_the_wan_codec():
    # 21 latent frames are Wan's 81 video frames (temporal stride 4, the first frame not stretched):
    # the unit of Self-Forcing's published 17 FPS.
    cfg = bench.load_config("wan1.3b")
    stats = bench.SamplerStats()
    stats.per_block.update(range(7))
    row = bench.summarize(cfg, 7, [[0.5, 1.0]], stats, {})
    assert (row["latent_frames"], row["video_frames"], row["video_fps"], row["first_block_s"]) == (21, 81, 81.0, 0.5)


def test_option_rows(tmp_path, capsys):
    """Each speed option as its own row next to the method's, or listed as skipped with the reason; an
    option changes how the cells run, not which."""
    out = tmp_path / "bench.json"
    bench.main(["run", "--config_path", "tiny", "--num_blocks", "3", "--repeats", "1", "--methods", "wavefront",
                "--options", "static", "compiled", "fp8", "decode", "decode_overlap", "backends",
                "--option_methods", "wavefront", "--json", str(out)])
    result = json.loads(out.read_text())
    rows, skipped = result["rows"], result["skipped"]
    options = ["static", "compiled", "fp8", "decode", "decode_overlap", *bench.BACKENDS]
    assert sorted([*rows, *skipped]) == sorted(["wavefront", *(f"wavefront+{o}" for o in options)])
    # On the CPU: no torchao fp8 and no CUDA-only SDPA kernel; SDPA itself always runs.
    assert {"wavefront+fp8", "wavefront+sdpa_efficient", "wavefront+sdpa_cudnn"} <= set(skipped)
    assert "compute capability" in skipped["wavefront+fp8"]
    assert {"wavefront+sdpa", "wavefront+sdpa_math", "wavefront+static", "wavefront+decode_overlap"} <= set(rows)
    base = rows["wavefront"]
    for name, r in rows.items():
        assert (r["forwards"], r["forwards_per_block"]) == (base["forwards"], base["forwards_per_block"])
        if name == "wavefront":
            assert r["time_vs_base"] is None and r["decode"] == "none"
            continue
        option = name.split("+")[1]
        assert r["option"] == option and r["time_vs_base"] > 0
        assert set(bench.OPTIONS[option][0]) <= set(r["overrides"])
        assert r["decode"] == {"decode": "inline", "decode_overlap": "overlap"}.get(option, "none")
    printed = capsys.readouterr().out
    assert "wavefront+fp8: not run (runtime.fp8_linear=torchao" in printed
    assert "time of each option row against its method's row: wavefront+static" in printed


def test_a_run_saves_every_row_as_it_finishes(monkeypatch):
    """A run stopped from outside (a GPU lease ending) keeps the rows it finished, marked incomplete."""
    row = {"block_s": {"median": 1.0}, "growth_bytes": 1, "num_blocks": 3}
    monkeypatch.setattr(bench, "run_row", lambda args, **spec: dict(row, block_s={"median": 1.0}))
    monkeypatch.setattr(bench, "unavailable", lambda args, option: None)
    args = bench.argparse.Namespace(methods=["frame_first", "wavefront"], options=["static"],
                                    option_methods=["wavefront"], num_blocks=3, repeats=1, stages=1, long_factor=1,
                                    device="cpu", config_path="tiny", overrides=[], threads=1, argv=[])
    saved = []
    final = bench.bench(args, lambda result: saved.append((list(result["rows"]), result["complete"])))
    assert saved == [(["frame_first"], False), (["frame_first", "wavefront"], False),
                     (["frame_first", "wavefront", "wavefront+static"], True)]
    assert final["rows"]["wavefront+static"]["time_vs_base"] == 1.0
    assert "incomplete" in bench.table({"rows": {}, "targets": {}, "complete": False})


def test_quality_measures_what_an_option_moves(tmp_path, capsys):
    """`quality`: nothing moves without an option; emulated fp8 linears move one forward by a few percent
    (e4m3 keeps 3 mantissa bits) and every block of both rollouts."""
    from conftest import random_model

    from hiar.checkpoints import save_model

    cfg = bench.load_config("tiny", ["runtime.prompts=data/toy_prompts.txt"])
    checkpoint = save_model(random_model(cfg), cfg, tmp_path / "model.safetensors")
    plain = bench.quality(str(checkpoint), [], 2)
    assert all(e == 0 for e in plain["forward"].values())
    assert all(e == 0 for errors in plain["rollout"].values() for e in errors)
    out = tmp_path / "quality.json"
    assert bench.main(["quality", "--checkpoint", str(checkpoint), "--num_blocks", "2", "--json", str(out),
                       "runtime.fp8_linear=emulate"]) == 0
    fp8 = json.loads(out.read_text())
    assert list(fp8["forward"]) == [f"{t:g}" for t in cfg.schedule.timesteps]
    assert all(0.001 < e < 0.3 for e in fp8["forward"].values())
    assert {k: len(v) for k, v in fp8["rollout"].items()} == {"sde": 2, "ode": 2}
    assert all(e > 0 for errors in fp8["rollout"].values() for e in errors)
    assert "runtime.fp8_linear=emulate against the plain run" in capsys.readouterr().out
