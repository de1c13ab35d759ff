"""The embedded default student (configs/toy/hiar.yaml's runtime.checkpoint): small, loadable, and its
clips show their prompts in any phrasing, so a broken default can never land."""

from pathlib import Path

from hiar.config import load_config
from hiar.toyfidelity import evaluate
from hiar.video import read_video

ROOT = Path(__file__).resolve().parent.parent


def test_embedded_default_draws_its_prompts_in_any_phrasing():
    """24 held-out clips, captioned in the template and in phrasings no stage trained on, from the same
    noise. Measured (README, "Generate"; docs/results.md at 10x has the 40-clip figures): colour 83% of
    template objects and 92% held-out, present in 83% / 89% of frames, every background right. The bars
    leave room for another machine's arithmetic; the held-out one is the issue's target (within 10 points
    of the template), which the first recipe's default, trained on the template alone, missed (82% against
    30%). Shape and direction are not drawn yet (shape 3-8%, direction at chance), so not checked."""
    cfg = load_config(ROOT / "configs/toy/hiar.yaml")
    path = ROOT / cfg.runtime.checkpoint
    assert path.is_file() and path.stat().st_size < 8 * 2**20  # a few MB: the repository stays small
    result, _ = evaluate(str(path), [], "student", 24, 24, ["template", "held_out"])
    template, held_out = (result["by_captions"][c] for c in ("template", "held_out"))
    assert template["colour"] >= 0.75 and held_out["colour"] >= template["colour"] - 0.10, result["by_captions"]
    assert min(template["presence"], held_out["presence"]) >= 0.75
    assert min(template["background"], held_out["background"]) >= 0.95


def test_inference_without_arguments_uses_the_default(tmp_path, capsys):
    import inference

    assert inference.main(["--output_folder", str(tmp_path), "--num_output_frames", "6"]) == 0
    assert "RANDOM" not in capsys.readouterr().err
    videos = sorted(tmp_path.glob("*.mp4"))
    assert videos and read_video(videos[0]).shape[0] == 6
