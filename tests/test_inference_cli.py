"""inference.py end to end on the tiny preset (random weights, the toy codec and text encoder)."""

import typing

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import inference
from hiar.codecs import ToyDCTCodec
from hiar.config import SamplingConfig, load_config
from hiar.video import read_video

TINY = ["--config_path", "tiny"]


def test_writes_a_playable_mp4_and_its_latents(tmp_path, capsys):
    rc = inference.main([*TINY, "--prompt", "a red circle moving left", "--output_folder", str(tmp_path),
                         "--num_output_frames", "9", "--save_latents", "--seed", "3"])
    assert rc == 0
    video = read_video(tmp_path / "a red circle moving left-0.mp4")
    assert video.shape == (9, 32, 32, 3)
    latents = load_file(tmp_path / "a red circle moving left-0.latents.safetensors")["latents"]
    assert latents.shape == (9, 16, 4, 4)
    # the video shows the decoded latents, up to H.264 loss (heavy on random-weight noise at 32x32)
    decoded = ToyDCTCodec().decode(latents[None])[0]
    expected = ((decoded + 1) * 127.5).permute(0, 2, 3, 1).numpy()
    assert np.abs(video.mean(axis=(1, 2)) - expected.mean(axis=(1, 2))).max() < 6  # per frame and channel
    assert np.corrcoef(video.ravel(), expected.ravel())[0, 1] > 0.8
    assert (tmp_path / "config.yaml").is_file()
    out = capsys.readouterr()
    assert "RANDOM weights" in out.err and "frames/s" in out.out


def test_existing_files_get_new_names_unless_overwrite(tmp_path, capsys):
    args = [*TINY, "--prompt", "x", "--output_folder", str(tmp_path), "--num_output_frames", "3"]
    assert inference.main(args) == 0 and inference.main(args) == 0
    assert sorted(p.name for p in tmp_path.glob("*.mp4")) == ["x-0 (2).mp4", "x-0.mp4"]
    assert inference.main([*args, "--overwrite"]) == 0
    assert len(list(tmp_path.glob("*.mp4"))) == 2


def test_prompt_file_sharded_across_ranks(tmp_path, monkeypatch):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("first\n\nsecond\nthird\n")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    rc = inference.main([*TINY, "--data_path", str(prompts), "--output_folder", str(tmp_path / "out"),
                         "--num_output_frames", "3", "--save_with_index", "--num_samples", "2",
                         "--inference_method", "frame_first"])
    assert rc == 0
    assert sorted(p.name for p in (tmp_path / "out").glob("*.mp4")) == ["1-0.mp4", "1-1.mp4"]


@pytest.mark.parametrize("args,message", [
    (["--prompt", "x", "--num_output_frames", "10"],
     "num_output_frames=10 is not a multiple of video.frames_per_block=3: use 9 or 12"),
    (["--data_path", "/nonexistent/prompts.txt"], "prompt file /nonexistent/prompts.txt does not exist"),
    (["--prompt", "  "], "no prompts"),
    (["--prompt", "x", "--data_path", "p.txt"], "one of --prompt or --data_path, not both"),
    (["--prompt", "x", "model.num_layer=3"], "did you mean 'num_layers'"),
    (["--prompt", "x", "--checkpoint_path", "/nonexistent.safetensors"], "does not exist"),
    (["--prompt", "x", "--config_path", "wan1.3b", "runtime.base_model=/nonexistent"],
     "/nonexistent: no Wan VAE (expected vae/ or Wan2.1_VAE.pth)"),
])
def test_bad_input_fails_before_compute(tmp_path, capsys, args, message):
    assert inference.main([*TINY, "--output_folder", str(tmp_path), *args]) == 2
    assert message in capsys.readouterr().err
    assert not list(tmp_path.glob("*.mp4"))


def test_unwritable_output_folder(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert inference.main([*TINY, "--prompt", "x", "--output_folder", str(blocker / "out")]) == 2
    assert "is not writable" in capsys.readouterr().err


def test_default_prompts_come_from_the_config(tmp_path):
    assert inference.main([*TINY, "--output_folder", str(tmp_path), "--num_output_frames", "3",
                           "--save_with_index"]) == 0
    assert sorted(p.name for p in tmp_path.glob("*.mp4")) == ["0-0.mp4", "1-0.mp4", "2-0.mp4"]


def test_unknown_method_is_refused():
    with pytest.raises(SystemExit):
        inference.main([*TINY, "--prompt", "x", "--inference_method", "random_order"])


@pytest.mark.parametrize("flag,field", [("--inference_method", "method"), ("--schedule", "schedule")])
def test_every_value_the_config_accepts_is_a_flag_value(flag, field):
    """The flags offer exactly the config's Literal: an order added to sampling.method reaches the CLI."""
    for value in typing.get_args(typing.get_type_hints(SamplingConfig)[field]):
        cfg = inference.resolve_config(inference.parse_args([*TINY, flag, value]))
        assert getattr(cfg.sampling, field) == value


def test_the_saved_config_has_the_run_length_and_the_presets_distill_lengths(tmp_path):
    assert inference.main([*TINY, "--prompt", "x", "--output_folder", str(tmp_path), "--num_output_frames", "6"]) == 0
    saved = load_config(tmp_path / "config.yaml")
    assert saved.video.num_latent_frames == 6 and saved.geometry.num_blocks == 2
    assert saved.distill.num_training_frames == load_config("tiny").distill.num_training_frames == 9


def test_a_saved_checkpoint_drives_inference(tmp_path):
    from hiar.checkpoints import save_model
    from hiar.config import load_config
    from conftest import random_model

    cfg = load_config("tiny")
    path = save_model(random_model(cfg, seed=4), cfg, tmp_path / "tiny.safetensors")
    outs = []
    for name in ("a", "b"):
        assert inference.main([*TINY, "--checkpoint_path", str(path), "--prompt", "x", "--save_latents",
                               "--output_folder", str(tmp_path / name), "--num_output_frames", "6"]) == 0
        outs.append(load_file(tmp_path / name / "x-0.latents.safetensors")["latents"])
    assert torch.equal(*outs)  # same checkpoint, same seed: the same video


def test_decode_overlap_writes_the_same_video(tmp_path):
    """--decode_overlap decodes block n while block n + 1 is generated: the same frames and latents."""
    videos, latents = [], []
    for name, extra in (("inline", []), ("overlap", ["--decode_overlap"])):
        folder = tmp_path / name
        assert inference.main([*TINY, "--prompt", "a red circle moving left", "--output_folder", str(folder),
                               "--num_output_frames", "12", "--save_latents", "--seed", "5", *extra]) == 0
        videos.append(read_video(folder / "a red circle moving left-0.mp4"))
        latents.append(load_file(folder / "a red circle moving left-0.latents.safetensors")["latents"])
    assert videos[0].shape == (12, 32, 32, 3)
    assert np.array_equal(videos[0], videos[1])
    assert torch.equal(latents[0], latents[1])
