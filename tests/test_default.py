"""The embedded default student (configs/toy/hiar.yaml's runtime.checkpoint): small, loadable, and its
clips show their prompts in any phrasing, so a broken default can never land."""

from pathlib import Path

import torch

from hiar.checkpoints import load_generator
from hiar.codecs import build_codec
from hiar.config import load_config
from hiar.flow import FlowMatching
from hiar.models import WanModel
from hiar.text import PromptBank
from hiar.toyfidelity import evaluate
from hiar.toyteacher import flow_errors, toy_batch
from hiar.video import read_video

ROOT = Path(__file__).resolve().parent.parent


def test_embedded_default_draws_its_prompts_in_any_phrasing():
    """48 held-out clips, captioned in the template and in phrasings no stage trained on, from the same
    noise. Measured (docs/toy_prompts.md, "The default from the step-4000 teacher"; README, "Generate"):
    colour 87% of template objects and 89% held-out, present in 87% / 90% of frames, every background right,
    and the prompted direction for 65% of the objects that move, both sets together (chance 25%; the
    default before it, distilled from the first teacher, draws 37% of them on these clips and fails). The
    bars leave room for another machine's arithmetic; the held-out one is the issue's target (within 10
    points of the template), which the first recipe's default, trained on the template alone, missed (82%
    against 30%). Shapes are drawn for 7% of the objects, too few to check yet."""
    cfg = load_config(ROOT / "configs/toy/hiar.yaml")
    path = ROOT / cfg.runtime.checkpoint
    assert path.is_file() and path.stat().st_size < 8 * 2**20  # a few MB: the repository stays small
    result, _ = evaluate(str(path), [], "student", 48, 24, ["template", "held_out"])
    template, held_out = (result["by_captions"][c] for c in ("template", "held_out"))
    assert template["colour"] >= 0.80 and held_out["colour"] >= template["colour"] - 0.10, result["by_captions"]
    assert min(template["presence"], held_out["presence"]) >= 0.80
    assert min(template["background"], held_out["background"]) >= 0.95
    moving = [o for s in (template, held_out) for c in s["per_clip"] for o in c["prompted"] if o["moves"]]
    assert len(moving) >= 40 and sum(o["direction_ok"] for o in moving) / len(moving) >= 0.50


def test_inference_without_arguments_uses_the_default(tmp_path, capsys):
    import inference

    assert inference.main(["--output_folder", str(tmp_path), "--num_output_frames", "6"]) == 0
    assert "RANDOM" not in capsys.readouterr().err
    videos = sorted(tmp_path.glob("*.mp4"))
    assert videos and read_video(videos[0]).shape[0] == 6


def test_shipped_teacher_denoises_the_toy_world():
    """checkpoints/toy_teacher.safetensors (README, "Train"; docs/toy_prompts.md, "The step-4000 teacher,
    made again and shipped"): a few MB, the 1x1-latent-token architecture its metadata names, and trained:
    its flow-matching error on 8 fresh toy clips at the middle noise levels is a fraction of an untrained
    model's (measured: 0.046 of it, and 0.049 for the first teacher shipped before it; the bar leaves room
    for another machine's arithmetic)."""
    path = ROOT / "checkpoints/toy_teacher.safetensors"
    assert path.stat().st_size < 8 * 2**20
    teacher, cfg = load_generator(path)
    assert list(cfg.model.patch_size) == [1, 1, 1] and cfg.video.num_latent_frames == 21
    cpu = torch.device("cpu")
    unseen = range(10**6, 10**6 + 8)  # training read the toy world's clips 0 to 55,999
    x0, captions = toy_batch(cfg, build_codec(cfg, cpu), unseen)
    text = PromptBank.for_config(cfg, cpu)(captions)
    flow = FlowMatching(cfg.train.timestep_shift)
    sigma = torch.linspace(0.3, 0.7, 8)
    torch.manual_seed(0)
    noise, untrained = torch.randn_like(x0), WanModel(cfg.model)
    with torch.no_grad():
        errors = [flow_errors(m.eval(), x0, text, flow, sigma, noise).mean().item() for m in (teacher, untrained)]
    assert errors[0] < 0.1 * errors[1], errors
