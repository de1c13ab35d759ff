"""train.captions: every toy training stage (teacher batches, ODE-pair prompts, distillation prompts)
captions the same clips as before, the template unchanged byte for byte by default, varied phrasings of
the same scene when asked, and never the held-out phrasings evaluation keeps unseen."""

import hashlib
import re

import pytest
import torch

from hiar.captions import HELD_OUT_VERBS, parse_caption, phrase
from hiar.checkpoints import checkpoint_config
from hiar.codecs import build_codec
from hiar.config import ROOT, ConfigError, load_config
from hiar.data import TRAINING_CAPTIONS, PromptSource, toy_caption, toy_samples
from hiar.toyteacher import toy_batch
from hiar.toyworld import sample_clip
from train import distill, ode_pairs

N = 40
ODE_SEED_OFFSET = 1_000_003  # train/ode_pairs.py: the ODE prompts are clips of seed ode.seed + this


def stage_captions(captions: str) -> dict[str, list[str]]:
    """The first N captions each training path reads with train.captions=`captions`, from the toy presets."""
    style = [f"train.captions={captions}"]
    teacher = load_config("configs/toy/teacher.yaml", style)
    _, batch = toy_batch(teacher, build_codec(teacher, "cpu"), list(range(N)))
    ode = ode_pairs.prompt_list(load_config("configs/toy/ode_pairs.yaml", [*style, f"ode.num_trajectories={N}"]))
    dmd = distill.dmd_prompts(load_config("configs/toy/hiar.yaml", style), rehearse=False)
    return {"teacher": batch, "ode": ode, "dmd": [dmd[i] for i in range(N)],
            "samples": [s["caption"] for s in toy_samples(3, 3, 64, 64, count=N, captions=captions)]}


def clips_of(stage: str) -> list:
    seed = {"teacher": load_config("configs/toy/teacher.yaml").train.seed,
            "ode": load_config("configs/toy/ode_pairs.yaml").ode.seed + ODE_SEED_OFFSET,
            "dmd": distill.DMD_PROMPT_SEED, "samples": 3}[stage]
    return [(seed, i, sample_clip(seed, i)) for i in range(N)]


def test_the_template_is_unchanged_byte_for_byte_on_every_training_path():
    # sha256 of these captions as the teacher, ODE-pair, distillation and shard paths made them before
    # train.captions existed: data, trajectories and the embedded checkpoint stay what they were trained on
    captions = stage_captions("template")
    text = "\n".join(captions["teacher"] + captions["ode"] + captions["dmd"] + captions["samples"])
    assert hashlib.sha256(text.encode()).hexdigest() == "a8f2cfede4b2f194db048e3b9264d33683a43ee203a0b36fab937b445510fda2"
    for stage, clips in ((s, clips_of(s)) for s in captions):
        assert captions[stage] == [clip.caption for _, _, clip in clips]


def test_the_recipe_trains_on_varied_captions_and_the_default_tuning_in_the_default_s_world():
    # every toy stage trains on the varied phrasings, and the LoRA tuning of the embedded student
    # (configs/toy/hiar_lora_long.yaml) in the world, phrasings and guidance the student was trained with
    presets = {p.stem: load_config(p).train.captions for p in sorted((ROOT / "configs/toy").glob("*.yaml"))
               if not p.name.startswith("codec")}
    assert len(presets) >= 8 and set(presets.values()) == {"varied"} and load_config("toy").train.captions == "varied"
    tuning = load_config(ROOT / "configs/toy/hiar_lora_long.yaml")
    default = checkpoint_config(ROOT / tuning.distill.generator)
    assert [(c.video.toy_motion, c.train.captions, c.distill.guidance_scale) for c in (tuning, default)] == \
        [("wrap", "varied", 6.0)] * 2


def test_varied_captions_phrase_the_same_scene_from_seed_and_index():
    varied, template = stage_captions("varied"), stage_captions("template")
    for stage, captions in varied.items():
        clips = clips_of(stage)
        assert captions == [phrase(clip.spec(), "varied", f"{seed}/{i}") for seed, i, clip in clips]
        assert [parse_caption(c) for c in captions] == [clip.spec() for _, _, clip in clips]  # the same scene
        assert sum(c != t for c, t in zip(captions, template[stage])) >= N - 2  # other words
        assert len(set(captions)) >= N - 2
    assert stage_captions("varied") == varied  # a pure function: a rerun or another rank reads the same
    # the key is (seed, index): the same scene under another seed is phrased otherwise
    clip = sample_clip(0, 0)
    assert len({toy_caption(clip, seed, 0, "varied") for seed in range(20)}) >= 15


def test_varied_captions_leave_the_pixels_unchanged():
    teacher = load_config("configs/toy/teacher.yaml")
    varied = load_config("configs/toy/teacher.yaml", ["train.captions=varied"])
    codec = build_codec(teacher, "cpu")
    assert torch.equal(toy_batch(teacher, codec, [5, 9])[0], toy_batch(varied, codec, [5, 9])[0])
    for a, b in zip(toy_samples(1, 4, 32, 32, count=5), toy_samples(1, 4, 32, 32, count=5, captions="varied")):
        assert (a["frames"] == b["frames"]).all() and a["params"] == b["params"]
        assert a["caption"] != b["caption"] and parse_caption(b["caption"]) == parse_caption(a["caption"])


def test_held_out_phrasings_never_reach_training():
    assert TRAINING_CAPTIONS == ("template", "varied")
    with pytest.raises(ConfigError, match=r"train\.captions: expected one of \['template', 'varied'\], got 'held_out'"):
        load_config("configs/toy/teacher.yaml", ["train.captions=held_out"])
    clip = sample_clip(0, 0)
    with pytest.raises(ValueError, match="held-out phrasings are for evaluation only"):
        toy_caption(clip, 0, 0, "held_out")
    with pytest.raises(ValueError, match="'held_out'"):
        PromptSource("toyworld", 0, 64, 64, captions="held_out")
    with pytest.raises(ValueError, match="'held_out'"):
        next(toy_samples(0, 3, 64, 64, captions="held_out"))
    # what training reads in either style: no held-out motion verb, no held-out caption
    held_out_verb = re.compile(rf"\b({'|'.join(HELD_OUT_VERBS)})\b", re.IGNORECASE)
    for style in TRAINING_CAPTIONS:
        for stage, captions in stage_captions(style).items():
            for (seed, i, clip), caption in zip(clips_of(stage), captions):
                assert not held_out_verb.search(caption), (stage, caption)
                assert caption not in {phrase(clip.spec(), "held_out", k) for k in (f"{seed}/{i}", i, 0)}
    source = PromptSource("toyworld", 11, 64, 64, captions="varied")
    assert not any(held_out_verb.search(source[i]) for i in range(2000))

