"""The toy world's Wan-shaped VAE: its geometry, its strict config, a training step whose gradient
reaches every layer (through diffusers' output clamp too), a single-batch overfit in which the decoder
comes to use its latents, and a resumed training run that equals an uninterrupted one."""

import dataclasses
import json
import random

import pytest
import torch

from hiar.codecs import WanVAE, build_codec
from hiar.config import ConfigError, load_config, with_overrides
from hiar.toycodec import (ToyCodecConfig, build_toy_vae, clip_batch, clip_length, decode_unclamped, edge_l1,
                           learning_rate, load_codec_config, object_mask, reconstruction_loss, spatial_stride)
from hiar.toyteacher import toy_batch
from hiar.toyworld import BACKGROUNDS, clip_to_video, sample_clip


def small(tmp_path, **extra) -> str:
    cfg = {"base_dim": 4, "num_frames": 5, "height": 32, "width": 32, "batch_size": 1, "log_every": 1,
           "save_every": 1, "eval_every": 2, "output_dir": str(tmp_path / "run"), **extra}
    path = tmp_path / "codec.yaml"
    path.write_text("".join(f"{k}: {v}\n" for k, v in cfg.items()))
    return str(path)


@pytest.mark.parametrize("dim_mult, pixels", [("[1,2,2,2]", 8), ("[1,2,4,4]", 8), ("[1,2,4]", 4)])
def test_the_toy_vae_has_wans_geometry(tmp_path, dim_mult, pixels):
    cfg = load_codec_config(small(tmp_path), [f"dim_mult={dim_mult}"])
    assert spatial_stride(cfg) == pixels
    video = clip_batch(cfg, 0)
    assert video.shape == (1, 3, 5, 32, 32) and video.min() >= -1 and video.max() <= 1
    vae = build_toy_vae(cfg)
    assert WanVAE(vae).stride == (4, pixels, pixels)
    with torch.no_grad():
        z = vae.encode(video).latent_dist.mode()
        decoded = vae.decode(z).sample
    side = 32 // pixels
    assert z.shape == (1, 16, 2, side, side)  # the first frame alone, then 4 frames a latent frame
    assert decoded.shape == video.shape
    assert torch.equal(clip_batch(cfg, 3), clip_batch(cfg, 3))
    assert not torch.equal(clip_batch(cfg, 3), clip_batch(cfg, 4))


def test_the_codec_config_is_strict(tmp_path):
    path = small(tmp_path)
    assert load_codec_config(path, ["lr=0.01"]).lr == 0.01
    assert load_codec_config(path, ["lr=3e-4"]).lr == 3e-4  # YAML 1.1 reads 3e-4 (no dot) as a string
    with pytest.raises(ConfigError, match="unknown config key 'lr_rate'"):
        load_codec_config(path, ["lr_rate=1"])
    with pytest.raises(ConfigError, match="expected int"):
        load_codec_config(path, ["steps=many"])
    with pytest.raises(ConfigError, match="must be 1 \\+ 4 k"):
        load_codec_config(path, ["num_frames=8"])
    with pytest.raises(ConfigError, match="must be 1 \\+ 4 k"):
        load_codec_config(path, ["max_frames=31"])
    with pytest.raises(ConfigError, match="below num_frames"):
        load_codec_config(path, ["num_frames=9", "max_frames=5"])
    assert load_codec_config(path, ["dim_mult=[1,2,4,4]"]).dim_mult == (1, 2, 4, 4)  # Wan2.1's
    with pytest.raises(ConfigError, match="needs 4 stages"):
        load_codec_config(path, ["dim_mult=[1,2]"])
    with pytest.raises(ConfigError, match="multiples of 8"):
        load_codec_config(path, ["height=36"])
    assert load_codec_config(path, ["height=36", "dim_mult=[1,2,4]"]).height == 36  # stride 4
    with pytest.raises(ConfigError, match="long_lr_from=30 needs a long_lr and must not pass long_from=20"):
        load_codec_config(path, ["long_from=20", "long_lr=1e-4", "long_lr_from=30"])
    with pytest.raises(ConfigError, match="needs a long_lr"):
        load_codec_config(path, ["long_from=20", "long_lr=0", "long_lr_from=10"])


def test_training_clips_take_lengths_drawn_per_step():
    """With max_frames every batch has a length 1 + 4 k of its own between num_frames and max_frames, the
    same on every call (a resumed run draws what an uninterrupted one did); without, all are num_frames."""
    cfg = ToyCodecConfig(num_frames=5, max_frames=17, height=16, width=16, batch_size=2)
    lengths = [clip_length(cfg, step) for step in range(40)]
    assert set(lengths) == {5, 9, 13, 17}
    assert lengths == [clip_length(cfg, step) for step in range(40)]
    assert clip_batch(cfg, 3).shape == (2, 3, lengths[3], 16, 16)
    assert clip_batch(cfg, 3, frames=1).shape == (2, 3, 1, 16, 16)
    assert {clip_length(ToyCodecConfig(num_frames=5), step) for step in range(40)} == {5}
    staged = ToyCodecConfig(num_frames=5, max_frames=17, long_from=20, lr=3e-4, long_lr=1e-4)
    assert [clip_length(staged, step) for step in range(40)] == [5] * 20 + lengths[20:]
    assert learning_rate(staged, 19) == 3e-4 and learning_rate(staged, 20) == 1e-4
    early = dataclasses.replace(staged, long_lr_from=10)  # the rate drops first, the clips lengthen later
    assert [learning_rate(early, step) for step in (9, 10, 19)] == [3e-4, 1e-4, 1e-4]
    assert [clip_length(early, step) for step in range(40)] == [5] * 20 + lengths[20:]


def test_the_edge_term_sees_blurred_outlines_not_offsets():
    """`edge_l1` compares neighbouring pixels' differences: zero for a uniform colour offset (no edge
    is wrong), positive for a blurred copy, although its pixelwise L1 is the smaller of the two; the loss
    adds it at edge_weight."""
    cfg = ToyCodecConfig(num_frames=1, batch_size=1)
    video = clip_batch(cfg, 0)
    blurred = torch.nn.functional.avg_pool3d(video, (1, 3, 3), stride=1, padding=(0, 1, 1), count_include_pad=False)
    assert float(edge_l1(video + 0.1, video)) < 1e-6  # pixelwise L1 0.1
    assert (blurred - video).abs().mean() < 0.02 and float(edge_l1(blurred, video)) > 0.02  # 0.012 and 0.028
    torch.manual_seed(0)
    vae = build_toy_vae(ToyCodecConfig(base_dim=4, num_frames=1))
    plain, metrics = reconstruction_loss(vae, video, kl_weight=0.0)
    with_edges, _ = reconstruction_loss(vae, video, kl_weight=0.0, edge_weight=2.0)
    assert float((with_edges - plain).detach()) == pytest.approx(2 * metrics["edge"], rel=1e-4)


def test_the_object_mask_covers_each_object_and_its_rim():
    """The pixels the object weight counts extra: every pixel not of the background colour and its
    neighbours, nothing two pixels or more away from an object."""
    cfg = ToyCodecConfig(batch_size=4)
    video = clip_batch(cfg, 0)
    mask = object_mask(video)[:, 0].bool()
    for b in range(cfg.batch_size):
        background = torch.tensor(BACKGROUNDS[sample_clip(cfg.seed, b).background]) / 127.5 - 1
        on_object = (video[b] - background[:, None, None, None]).abs().amax(0) > 1e-3  # [F, H, W]
        near = torch.nn.functional.max_pool2d(on_object.float(), 3, stride=1, padding=1).bool()
        assert on_object.any() and torch.equal(mask[b], near)
    # the loss adds object_weight times the L1 over those pixels (as a mean over all of them)
    torch.manual_seed(0)
    vae = build_toy_vae(ToyCodecConfig(base_dim=4))
    with torch.no_grad():
        decoded = decode_unclamped(vae, vae.encode(video).latent_dist.mode())
        plain, _ = reconstruction_loss(vae, video, kl_weight=0.0)
        weighted, _ = reconstruction_loss(vae, video, kl_weight=0.0, object_weight=3.0)
    on_objects = ((decoded - video).abs() * mask[:, None]).mean()
    assert float(weighted - plain) == pytest.approx(3 * float(on_objects), rel=1e-4)


def test_the_gradient_reaches_every_layer_even_past_the_output_clamp(tmp_path):
    cfg = load_codec_config(small(tmp_path))
    torch.manual_seed(0)
    vae = build_toy_vae(cfg)
    video = clip_batch(cfg, 0)
    # the residual branches start at zero (`initialise`), so the first step reaches only their last
    # convolutions and moves them off zero; from the second on the gradient reaches every parameter
    optimizer = torch.optim.AdamW(vae.parameters(), lr=cfg.lr)
    reconstruction_loss(vae, video, cfg.kl_weight)[0].backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    reconstruction_loss(vae, video, cfg.kl_weight)[0].backward()
    dead = [n for n, p in vae.named_parameters() if p.grad is None or not p.grad.abs().max() > 0]
    assert not dead, f"no gradient reaches {dead}"
    # every pixel pushed past diffusers' clamp to [-1, 1]: the decode is flat there, yet the loss still pulls
    with torch.no_grad():
        vae.decoder.conv_out.bias.fill_(3.0)
        z = vae.encode(video).latent_dist.mode()
        assert torch.equal(decode_unclamped(vae, z).clamp(-1, 1), vae.decode(z).sample)
    vae.zero_grad()
    reconstruction_loss(vae, video, cfg.kl_weight)[0].backward()
    assert vae.decoder.conv_out.bias.grad.min() > 0 and vae.encoder.conv_in.weight.grad.abs().max() > 0


def test_the_learning_rate_warms_up():
    cfg = ToyCodecConfig(lr=3e-4, warmup_steps=50)
    assert learning_rate(cfg, 0) == pytest.approx(6e-6) and learning_rate(cfg, 24) == pytest.approx(1.5e-4)
    assert learning_rate(cfg, 49) == learning_rate(cfg, 5000) == 3e-4
    assert learning_rate(ToyCodecConfig(lr=1e-3, warmup_steps=0), 0) == 1e-3


def trained(cfg, batches):
    """A fresh VAE (seed 0) after one AdamW step on each of `batches` at the trainer's rate; its last metrics."""
    torch.manual_seed(0)
    vae = build_toy_vae(cfg)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=cfg.lr, betas=(0.9, 0.99))
    for step, video in enumerate(batches):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(cfg, step)
        loss, metrics = reconstruction_loss(vae, video, cfg.kl_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return vae, metrics


def test_a_single_batch_overfit_makes_the_decoder_use_its_latents():
    """The check the first runs lacked: at 64x64 the VAE first learns one flat colour for every clip (the
    decoder ignoring its latents, about 17 dB) and must leave that plateau. At the default learning rate,
    one fixed batch of two clips (one frame, base_dim 8) leaves it within 150 steps (about 15 s on one
    thread): its L1 falls below half the flat colour's and the two clips decode about as far apart as they
    are. It fails for a decoder cut off from its latents (a detach, a loss that reads the wrong tensor);
    the plateau on fresh batches is the next test's."""
    cfg = ToyCodecConfig(base_dim=8, num_frames=1, batch_size=2)
    video = clip_batch(cfg, 0)
    vae, metrics = trained(cfg, [video] * 150)
    flat = (video - video.mean()).abs().mean()  # one colour for every pixel of both clips
    with torch.no_grad():
        decoded = vae.decode(vae.encode(video).latent_dist.mode()).sample
    assert metrics["l1"] < flat / 2, (metrics, float(flat))
    assert (decoded[0] - decoded[1]).abs().mean() > 0.6 * (video[0] - video[1]).abs().mean()


def test_a_short_run_on_fresh_clips_leaves_the_flat_colour_plateau():
    """The defect of the first runs, reproduced small: on a new batch every step, a VAE with PyTorch's
    default initialisation first decodes every clip to one flat colour and, at lr 3e-4, mostly stays there
    (four held-out clips' decodes spread 0.00-0.08 times as much as the clips after 300 steps, seeds
    0-3, one thread, one-frame clips, base_dim 8, 64x64; a run of seed 0 on two threads did leave); so
    did every full-size run. With `initialise` (He-normal, zero biases, residual branches starting at
    zero) the decoder uses its latents by step 300 in all four seeds (0.68-0.83). About 20 s."""
    cfg = ToyCodecConfig(base_dim=8, num_frames=1, batch_size=2, lr=3e-4)
    held = clip_batch(ToyCodecConfig(num_frames=1, batch_size=2, seed=9), 0)
    vae, _ = trained(cfg, (clip_batch(cfg, step) for step in range(300)))
    with torch.no_grad():
        decoded = vae.decode(vae.encode(held).latent_dist.mode()).sample
    apart, inputs_apart = (decoded[0] - decoded[1]).abs().mean(), (held[0] - held[1]).abs().mean()
    assert apart > 0.3 * inputs_apart, f"held-out clips decode {apart:.4f} apart (inputs: {inputs_apart:.4f})"


def test_a_resumed_run_equals_an_uninterrupted_one_and_exports_a_wan_vae(tmp_path, capsys):
    from train import toy_codec

    once, twice = tmp_path / "a", tmp_path / "b"
    once.mkdir(), twice.mkdir()
    # random lengths and the edge and object terms resume exactly too
    extra = {"max_frames": 9, "edge_weight": 0.5, "object_weight": 2}
    assert toy_codec.main(["--config_path", small(once, **extra), "steps=2"]) == 0
    assert toy_codec.main(["--config_path", small(twice, **extra), "steps=1"]) == 0
    assert toy_codec.main(["--config_path", small(twice, **extra), "steps=2"]) == 2  # a fresh run never replaces one
    assert "--resume" in capsys.readouterr().err
    log = twice / "run" / "log.jsonl"
    log.write_text(log.read_text() + '{"step": 7}\n')  # logged by a run stopped before its next save
    assert toy_codec.main(["--config_path", small(twice, **extra), "--resume", "steps=2"]) == 0
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2]
    a = torch.load(once / "run" / "state.pt", weights_only=True)
    b = torch.load(twice / "run" / "state.pt", weights_only=True)
    assert a["step"] == b["step"] == 2
    assert all(torch.equal(a["vae"][k], b["vae"][k]) for k in a["vae"])
    # every eval_every steps the log has the held-out round trip too (validating changes nothing above)
    lines = [json.loads(line) for line in (once / "run" / "log.jsonl").read_text().splitlines()]
    assert "held_psnr" not in lines[0] and lines[1]["held_psnr"] > 0 and lines[1]["held_spread"] >= 0
    codec = WanVAE.from_folder(once / "run")  # the exported folder loads as the full-size VAE does
    assert codec.mean.shape == (1, 1, 16, 1, 1) and (codec.std > 0).all()
    z = codec.encode(torch.rand(1, 9, 3, 32, 32) * 2 - 1)
    stream = codec.stream_decoder()
    assert torch.equal(torch.cat([stream.decode(z[:, :1]), stream.decode(z[:, 1:])], 1), codec.decode(z))
    assert (once / "run" / "ceiling.json").is_file()
    # a toy model trained on it sees clips of 1 + 4 (F - 1) frames as F latent frames
    cfg = load_config("toy", ["video.codec=wan_vae", "video.vae_stride=[4,8,8]", f"runtime.base_model={once / 'run'}",
                              "video.num_latent_frames=3", "video.height=32", "video.width=32"])
    assert toy_batch(cfg, codec, [0, 1])[0].shape == (2, 3, 16, 4, 4)
    assert build_codec(cfg).stride == (4, 8, 8)
    with pytest.raises(ConfigError, match=r"has strides \[4, 8, 8\].*set video.vae_stride=\[4, 8, 8\]"):
        build_codec(with_overrides(cfg, ["video.vae_stride=[4,4,4]"]))  # the weights decide, before any compute


def test_a_fresh_run_can_start_from_another_runs_weights(tmp_path, capsys):
    """init_from: a new run (its own step count, optimizer and folder) from a state.pt's weights, or from
    an exported vae/ folder's; with no steps to take it exports exactly those weights. A missing file is
    refused before any compute."""
    from diffusers import AutoencoderKLWan

    from train import toy_codec

    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir(), second.mkdir()
    assert toy_codec.main(["--config_path", small(first), "steps=1"]) == 0
    assert toy_codec.main(["--config_path", small(second), "init_from=nowhere/state.pt", "steps=1"]) == 2
    assert "init_from=nowhere/state.pt" in capsys.readouterr().err
    start = first / "run" / "state.pt"
    assert toy_codec.main(["--config_path", small(second), f"init_from={start}", "base_dim=8", "steps=0"]) == 2
    assert "does not fit this VAE" in capsys.readouterr().err
    assert toy_codec.main(["--config_path", small(second), f"init_from={start}", "steps=0"]) == 0
    trained = torch.load(start, weights_only=True)["vae"]
    exported = AutoencoderKLWan.from_pretrained(second / "run" / "vae").state_dict()
    assert exported.keys() == trained.keys() and all(torch.equal(exported[k], trained[k]) for k in trained)
    third = tmp_path / "c"  # from the exported folder: the same weights again
    third.mkdir()
    assert toy_codec.main(["--config_path", small(third), f"init_from={second / 'run'}", "steps=0"]) == 0
    again = AutoencoderKLWan.from_pretrained(third / "run" / "vae").state_dict()
    assert all(torch.equal(again[k], trained[k]) for k in trained)


def test_the_shipped_stride4_vae_keeps_the_toy_worlds_shapes_colours_and_directions():
    """checkpoints/toy_vae_s4 (configs/toy/codec_s4.yaml, stored in fp16): Wan's temporal stride 4 and
    causal decoder at spatial stride 4; held-out clips of 21 frames come back with every colour and
    direction and most shapes (docs/toy_prompts.md, "The stride-4 VAE in one run")."""
    from hiar.config import repo_path
    from hiar.toyfidelity import held_out_clips, round_trip

    codec = WanVAE.from_folder(repo_path("checkpoints/toy_vae_s4"))
    assert codec.stride == (4, 4, 4) and next(codec.vae.parameters()).dtype == torch.float32
    result = round_trip(codec, held_out_clips(8, 64, 64), 21)  # 13 objects: 100%, 100%, 92% (12), 26.8 dB
    assert result["colour"] == 1.0 and result["direction"] == 1.0 and result["shape"] >= 0.9
    assert result["psnr"] > 26.0


def test_every_toy_stage_draws_its_clips_from_the_configured_world():
    """video.toy_motion (teacher batches) and the codec's `motion` pick the world; the clips, their start
    frames and captions stay the same, only what objects do at a border changes."""
    from hiar.captions import parse_caption
    from hiar.codecs import ToyDCTCodec
    from hiar.toyteacher import encode_clips

    cfg = ToyCodecConfig(num_frames=9, height=64, width=64, batch_size=2, seed=5)
    wrapped = dataclasses.replace(cfg, motion="wrap")
    starts = [random.Random(f"toycodec/5/{i}").randrange(1000) for i in range(2)]
    expected = [sample_clip(5, i, motion="wrap").render(9, s) for i, s in enumerate(starts)]
    videos = torch.stack([torch.from_numpy(clip_to_video(frames)) for frames in expected])
    assert torch.equal(clip_batch(wrapped, 0), videos.transpose(1, 2))
    assert not torch.equal(clip_batch(cfg, 0), clip_batch(wrapped, 0))  # the first world's clips, bounced
    teacher = load_config("configs/toy/teacher.yaml", ["video.num_latent_frames=48", "video.toy_motion=wrap"])
    latents, captions = toy_batch(teacher, ToyDCTCodec(), [0, 1])
    clips = [sample_clip(teacher.train.seed, i, motion="wrap") for i in (0, 1)]
    assert torch.equal(latents, encode_clips(ToyDCTCodec(), clips, 48))
    assert [parse_caption(c) for c in captions] == [c.spec() for c in clips]  # in the presets' phrasing
