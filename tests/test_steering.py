"""Steering a generation (hiar/conditioning.py): prompt switches in both modes, continuation from clean
prefix frames, the schedule's errors, and the stream that inference and the live demo read."""

import numpy as np
import pytest
import torch

from hiar.conditioning import Conditioning, Segment, block_at_second, parse_switch_time, read_schedule
from hiar.config import load_config
from hiar.models import Cached, KVCache
from hiar.sampling import CellRunner, run_order, sample_video, timestep_first

from conftest import random_model, rollout_inputs as setup

BLOCKS, SWITCH = 6, 3


@pytest.fixture(scope="module")
def model():
    return random_model(load_config("tiny"))


def other_prompt(text):
    return torch.randn(text.shape, generator=torch.Generator().manual_seed(11))


def switched(text, at=SWITCH):
    return Conditioning([Segment(0, text), Segment(at, other_prompt(text))])


def video(model, cond, *overrides, blocks=BLOCKS):
    cfg, noise, _ = setup(*overrides, frames=3 * blocks)
    with torch.no_grad():
        return sample_video(model, cond, cfg, noise, blocks)


ORDERS = [["sampling.method=timestep_first"], ["sampling.method=frame_first"],
          ["sampling.method=hybrid_block0", "sampling.num_frame_first_blocks=2"]]


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("mode", ["new_blocks", "recache"])
def test_blocks_before_a_switch_are_untouched(model, order, mode):
    _, _, text = setup()
    plain = video(model, text, *order)
    steered = video(model, switched(text), *order, f"sampling.switch={mode}")
    k = 3 * SWITCH
    assert torch.equal(steered[:, :k], plain[:, :k])
    assert not torch.allclose(steered[:, k:], plain[:, k:])


@pytest.mark.parametrize("mode", ["new_blocks", "recache"])
@pytest.mark.parametrize("extra", [[], ["sampling.fused=true"], ["video.window_frames=7", "video.sink_frames=1"]])
def test_a_switch_is_the_same_in_every_schedule(model, mode, extra):
    _, _, text = setup()
    a = video(model, switched(text), "sampling.schedule=step_major", f"sampling.switch={mode}", *extra)
    b = video(model, switched(text), "sampling.schedule=wavefront", f"sampling.switch={mode}", *extra)
    assert torch.equal(a, b)


def test_the_modes_differ_after_a_switch(model):
    _, _, text = setup()
    a = video(model, switched(text), "sampling.switch=new_blocks")
    b = video(model, switched(text), "sampling.switch=recache")
    assert torch.equal(a[:, :3 * SWITCH], b[:, :3 * SWITCH]) and not torch.allclose(a[:, 3 * SWITCH:], b[:, 3 * SWITCH:])


@pytest.mark.parametrize("window", [[], ["video.window_frames=7", "video.sink_frames=1"]])
def test_recache_equals_a_fresh_cache_built_under_the_new_prompt(model, window):
    """Re-cache at block b == blocks < b generated under the old prompt, then every step's cache rebuilt
    from scratch by writing the context those blocks left (the frames it still holds) under the new
    prompt, then blocks >= b generated from those caches."""
    cfg, noise, text = setup("sampling.switch=recache", "sampling.schedule=step_major", *window, frames=3 * BLOCKS)
    new = other_prompt(text)
    with torch.no_grad():
        steered = sample_video(model, Conditioning([Segment(0, text), Segment(SWITCH, new)]), cfg, noise, BLOCKS)
        old = CellRunner(model, text, cfg, noise)
        contexts = {j: old.new_context() for j in range(old.num_steps)}
        for _ in timestep_first(old, contexts, ((n, noise.initial(n)) for n in range(SWITCH)), "step_major"):
            pass
        fresh = CellRunner(model, new, cfg, noise)
        rebuilt = {}
        for j, ctx in contexts.items():
            writes = [*ctx.kept, ctx.pending]
            rebuilt[j] = fresh.new_context()
            for w in writes:
                fresh.write(rebuilt[j], w, segment=0)
            old.flush(ctx)
            assert rebuilt[j].kv.frames() == ctx.kv.frames()  # the same frames, written under the new prompt
        rest = dict(timestep_first(fresh, rebuilt, ((n, noise.initial(n)) for n in range(SWITCH, BLOCKS)), "step_major"))
    assert torch.equal(steered[:, 3 * SWITCH:], torch.cat([rest[n] for n in range(SWITCH, BLOCKS)], dim=1))



@pytest.mark.parametrize("window", [["video.window_frames=6"], ["video.window_frames=7", "video.sink_frames=1"]])
@pytest.mark.parametrize("order", ORDERS[:2])
@pytest.mark.parametrize("cache", ["dict", "static"])
def test_a_recache_after_the_window_has_slid(model, window, order, cache):
    """A re-cache at block 6 of 8, long after the window dropped the first blocks, rebuilds what the
    window holds: the oldest replayed block sees the sink and the rebuilt frames, never an evicted one
    (which would be a CacheMissError). Blocks before the switch stay untouched."""
    _, _, text = setup()
    overrides = [*order, *window, "sampling.switch=recache", f"runtime.kv_cache={cache}"]
    plain = video(model, text, *overrides, blocks=8)
    steered = video(model, switched(text, at=6), *overrides, blocks=8)
    assert torch.equal(steered[:, :18], plain[:, :18]) and not torch.allclose(steered[:, 18:], plain[:, 18:])

def test_each_prompt_is_encoded_once(model, monkeypatch):
    _, _, text = setup()
    calls = []
    real = model.prompt
    monkeypatch.setattr(model, "prompt", lambda states: calls.append(states.shape) or real(states))
    video(model, switched(text), "sampling.switch=recache")
    assert len(calls) == 2


@pytest.mark.parametrize("order", ORDERS)
def test_a_prefix_is_clean_context_in_every_cache(model, order):
    """The prefix's K/V in each cache equal a direct write of it at t = 0, and it changes the video."""
    cfg, noise, text = setup(*order, frames=9)
    prefix = torch.randn(2, 1, *noise.block_shape[1:], generator=torch.Generator().manual_seed(3))
    cond = Conditioning([Segment(0, text)], prefix=prefix)
    runner = CellRunner(model, cond, cfg, noise)
    ctx = runner.new_context()
    direct = KVCache(cfg.model.num_layers, runner.window)
    with torch.no_grad():
        model(prefix, 0.0, model.prompt(text), Cached(direct, 0, 1))
        assert ctx.kv.frames() == [0] and torch.equal(ctx.kv.read(0, [0])[0], direct.read(0, [0])[0])
        with_prefix = sample_video(model, cond, cfg, noise, 3)
        without = sample_video(model, text, cfg, noise, 3)
    assert with_prefix.shape == without.shape and not torch.allclose(with_prefix, without)


def test_a_prefix_keeps_blocks_aligned_after_it(model):
    """Block n of a continuation after P prefix frames covers frames P + nk .. P + nk + k - 1."""
    cfg, noise, text = setup(frames=9)
    prefix = torch.zeros(2, 2, *noise.block_shape[1:])
    runner = CellRunner(model, Conditioning([Segment(0, text)], prefix=prefix), cfg, noise)
    assert [runner.start_frame(n) for n in range(3)] == [2, 5, 8]
    assert runner.window.context_frames(5, 8) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="block boundary"):
        runner.window.context_frames(3, 6)


def test_a_switch_beyond_the_video_is_refused_before_compute(model):
    cfg, noise, text = setup(frames=9)
    with pytest.raises(ValueError, match="switches at block 3, but the video has 3 blocks"):
        next(run_order(CellRunner(model, switched(text, at=3), cfg, noise), 3))


def test_schedule_errors():
    text = torch.zeros(2, 4, 8)
    with pytest.raises(ValueError, match="starts at block 0"):
        Conditioning([Segment(1, text)])
    with pytest.raises(ValueError, match="increasing"):
        Conditioning([Segment(0, text), Segment(2, text), Segment(2, text)])
    with pytest.raises(ValueError, match="same batch"):
        Conditioning([Segment(0, text), Segment(1, torch.zeros(1, 4, 8))])
    with pytest.raises(ValueError, match="b<N>"):
        parse_switch_time("soon", 16, 4, 3)
    with pytest.raises(ValueError, match="<time> <prompt>"):
        read_schedule(["2s"], "schedule.txt")


def test_switch_times():
    # Wan: latent frame 0 -> 1 video frame, later ones 4; blocks of 3 start at video frames 0, 9, 21, 33 ...
    assert [block_at_second(s, 16, 4, 3) for s in (0, 0.5, 0.6, 1.3, 1.4)] == [0, 1, 2, 2, 3]
    # the toy codec: one video frame a latent frame; 8 fps, blocks start at 0, 3, 6 ...
    assert [parse_switch_time(t, 8, 1, 3) for t in ("0s", "0.375s", "0.4s", "b7")] == [0, 1, 2, 7]
    assert read_schedule(["# comment", "", "b2 a blue square", "1.5s  a red circle "], "f") == [
        ("b2", "a blue square"), ("1.5s", "a red circle")]


# -- inference.py: switches, --image, --video ---------------------------------------------------------

import inference  # noqa: E402
from hiar.video import read_video, write_video  # noqa: E402

TOY = ["--num_output_frames", "9", "--save_latents"]


def toy_latents(folder):
    from safetensors.torch import load_file

    (path,) = folder.glob("*.latents.safetensors")
    return load_file(path)["latents"]


def test_inference_switches_prompts(tmp_path):
    plain, steered = tmp_path / "plain", tmp_path / "steered"
    assert inference.main([*TOY, "--prompt", "a red circle moving left on a black background",
                           "--output_folder", str(plain)]) == 0
    schedule = tmp_path / "schedule.txt"
    schedule.write_text("# time prompt\n0.75s a blue square moving right on a white background\n")
    assert inference.main([*TOY, "--prompt", "a red circle moving left on a black background",
                           "--prompt_schedule", str(schedule), "--output_folder", str(steered)]) == 0
    a, b = toy_latents(plain), toy_latents(steered)
    assert torch.equal(a[:6], b[:6]) and not torch.allclose(a[6:], b[6:])  # 0.75 s at 8 fps: block 2


@pytest.mark.parametrize("flags,message", [
    (["--switch", "b3", "a blue square"], "beyond the video's 3 blocks"),
    (["--switch", "b0", "a blue square"], "give it as --prompt"),
    (["--switch", "soon", "a blue square"], "b<N>"),
    (["--prompt_schedule", "/nonexistent/schedule.txt"], "cannot read --prompt_schedule"),
    (["--image", "/nonexistent/image.png"], "cannot read /nonexistent/image.png"),
])
def test_bad_steering_input_is_refused_before_compute(tmp_path, capsys, monkeypatch, flags, message):
    monkeypatch.setattr(inference, "build_generation", lambda *a: pytest.fail("compute started"))
    assert inference.main([*TOY, "--prompt", "a red circle", "--output_folder", str(tmp_path), *flags]) == 2
    assert message in capsys.readouterr().err


def test_a_resolution_mismatch_is_refused(tmp_path, capsys):
    import imageio.v3 as iio

    iio.imwrite(tmp_path / "big.png", np.zeros((32, 48, 3), np.uint8))
    assert inference.main([*TOY, "--prompt", "a red circle", "--image", str(tmp_path / "big.png"),
                           "--output_folder", str(tmp_path / "out")]) == 2
    assert "is 48x32, but this config generates 64x64" in capsys.readouterr().err


def test_image_and_video_continuation(tmp_path):
    """An image leads the video as its first frame; a video is continued (the output is the new frames)."""
    import imageio.v3 as iio

    from hiar.toyworld import sample_clip

    clip = sample_clip(0, 0)
    frames = clip.render(12)  # uint8 [F, H, W, 3]
    iio.imwrite(tmp_path / "first.png", frames[0])
    write_video(tmp_path / "clip.mp4", frames, 8)
    args = [*TOY, "--prompt", clip.caption]
    assert inference.main([*args, "--image", str(tmp_path / "first.png"), "--output_folder", str(tmp_path / "i2v")]) == 0
    assert inference.main([*args, "--video", str(tmp_path / "clip.mp4"), "--output_folder", str(tmp_path / "v2v")]) == 0
    (i2v,), (v2v,) = (tmp_path / "i2v").glob("*.mp4"), (tmp_path / "v2v").glob("*.mp4")
    image_video = read_video(i2v)
    assert image_video.shape[0] == 10 and read_video(v2v).shape[0] == 9
    # the first frame is the image, through the toy codec's round trip
    assert np.abs(image_video[0].astype(float) - frames[0]).mean() < 12


def test_the_steering_measure_reads_the_toy_world():
    """eval/steering.py's frame measure recovers a rendered clip's background, object colour and centroid,
    and a video is scored by its distance to the two references: a copy of the new prompt's video is all
    new (share 1, old remaining 0), and one of the old prompt's all old."""
    from eval import steering
    from hiar.toyworld import BACKGROUNDS, OBJECT_COLOURS, sample_clip

    old, new = [c for c in (sample_clip(0, i) for i in range(20)) if len(c.objects) == 1][:2]
    frames = old.render(6)
    f = steering.features(frames)
    obj = old.objects[0]
    assert np.array_equal(f["background"], np.tile(BACKGROUNDS[old.background], (6, 1)))
    assert np.allclose(f["colour"], OBJECT_COLOURS[obj.colour])
    truth = np.array([obj.centroid(i, old.height, old.width) for i in range(6)])
    assert np.abs(f["centroid"] - truth).max() < 0.5
    refs = {"old": f, "new": steering.features(new.render(6))}
    for measure in steering.MEASURES:
        gap = steering.distance(refs["old"], refs["new"], measure)[None]  # [1 run, F]
        for copy, share, remaining in (("new", 1.0, 0.0), ("old", 0.0, 1.0)):
            d_new, d_old = (steering.distance(refs[copy], refs[r], measure)[None] for r in ("new", "old"))
            scores = steering.per_block(d_new, d_old, gap, 3, 1, 2)  # blocks 0 and 1 of 3 frames
            assert scores["share new"] == [share] * 2 and scores["old remaining"] == [remaining] * 2, measure
