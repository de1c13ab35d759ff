"""The toy world's Wan-shaped VAE: its geometry, its strict config, and a resumed training run that
equals an uninterrupted one."""

import json

import pytest
import torch

from hiar.codecs import WanVAE
from hiar.config import ConfigError
from hiar.toycodec import build_toy_vae, clip_batch, load_codec_config


def small(tmp_path, **extra) -> str:
    cfg = {"base_dim": 4, "num_frames": 5, "height": 32, "width": 32, "batch_size": 1, "log_every": 1,
           "save_every": 1, "output_dir": str(tmp_path / "run"), **extra}
    path = tmp_path / "codec.yaml"
    path.write_text("".join(f"{k}: {v}\n" for k, v in cfg.items()))
    return str(path)


def test_the_toy_vae_has_wans_geometry(tmp_path):
    cfg = load_codec_config(small(tmp_path))
    video = clip_batch(cfg, 0)
    assert video.shape == (1, 3, 5, 32, 32) and video.min() >= -1 and video.max() <= 1
    with torch.no_grad():
        z = build_toy_vae(cfg).encode(video).latent_dist.mode()
    assert z.shape == (1, 16, 2, 4, 4)  # the first frame alone, then 4 frames a latent frame; 8x8 pixels
    assert torch.equal(clip_batch(cfg, 3), clip_batch(cfg, 3))
    assert not torch.equal(clip_batch(cfg, 3), clip_batch(cfg, 4))


def test_the_codec_config_is_strict(tmp_path):
    path = small(tmp_path)
    assert load_codec_config(path, ["lr=0.01"]).lr == 0.01
    with pytest.raises(ConfigError, match="unknown toy codec key 'lr_rate'"):
        load_codec_config(path, ["lr_rate=1"])
    with pytest.raises(ConfigError, match="expected int"):
        load_codec_config(path, ["steps=many"])
    with pytest.raises(ConfigError, match="must be 1 \\+ 4 k"):
        load_codec_config(path, ["num_frames=8"])


def test_a_resumed_run_equals_an_uninterrupted_one_and_exports_a_wan_vae(tmp_path, capsys):
    from train import toy_codec

    once, twice = tmp_path / "a", tmp_path / "b"
    once.mkdir(), twice.mkdir()
    assert toy_codec.main(["--config_path", small(once), "steps=2"]) == 0
    assert toy_codec.main(["--config_path", small(twice), "steps=1"]) == 0
    assert toy_codec.main(["--config_path", small(twice), "steps=2"]) == 2  # a fresh run never replaces one
    assert "--resume" in capsys.readouterr().err
    log = twice / "run" / "log.jsonl"
    log.write_text(log.read_text() + '{"step": 7}\n')  # logged by a run stopped before its next save
    assert toy_codec.main(["--config_path", small(twice), "--resume", "steps=2"]) == 0
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2]
    a = torch.load(once / "run" / "state.pt", weights_only=True)
    b = torch.load(twice / "run" / "state.pt", weights_only=True)
    assert a["step"] == b["step"] == 2
    assert all(torch.equal(a["vae"][k], b["vae"][k]) for k in a["vae"])
    codec = WanVAE.from_folder(once / "run")  # the exported folder loads as the full-size VAE does
    assert codec.mean.shape == (1, 1, 16, 1, 1) and (codec.std > 0).all()
    z = codec.encode(torch.rand(1, 9, 3, 32, 32) * 2 - 1)
    stream = codec.stream_decoder()
    assert torch.equal(torch.cat([stream.decode(z[:, :1]), stream.decode(z[:, 1:])], 1), codec.decode(z))
    assert (once / "run" / "ceiling.json").is_file()
