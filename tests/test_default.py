"""The embedded default student (configs/toy/hiar.yaml's runtime.checkpoint): small, loadable, and its
clips show their prompts, so a broken default can never land."""

from pathlib import Path

import torch

from hiar.checkpoints import load_generator
from hiar.codecs import build_codec
from hiar.config import load_config
from hiar.sampling import block_noise, sample_video
from hiar.text import build_text_encoder
from hiar.toyfidelity import HELD_OUT_SEED
from hiar.toyworld import caption_fidelity, fidelity_verdict, sample_clip
from hiar.video import read_video, to_uint8

ROOT = Path(__file__).resolve().parent.parent


def test_embedded_default_draws_its_prompts():
    cfg = load_config(ROOT / "configs/toy/hiar.yaml")
    path = ROOT / cfg.runtime.checkpoint
    assert path.is_file() and path.stat().st_size < 8 * 2**20  # a few MB: the repository stays small
    model, _ = load_generator(path, cfg)
    captions = [sample_clip(HELD_OUT_SEED, i).caption for i in range(8)]
    with torch.no_grad():
        x0 = sample_video(model.eval(), build_text_encoder(cfg)(captions), cfg, block_noise(cfg, 0, range(8)), 7)
    verdicts = [fidelity_verdict(caption_fidelity(to_uint8(v), c)) for v, c in zip(build_codec(cfg).decode(x0), captions)]
    assert sum(v["colours_ok"] for v in verdicts) >= 5, verdicts  # measured: see docs/results.md


def test_inference_without_arguments_uses_the_default(tmp_path, capsys):
    import inference

    assert inference.main(["--output_folder", str(tmp_path), "--num_output_frames", "6"]) == 0
    assert "RANDOM" not in capsys.readouterr().err
    videos = sorted(tmp_path.glob("*.mp4"))
    assert videos and read_video(videos[0]).shape[0] == 6
