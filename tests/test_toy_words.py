"""eval.toy_words: which caption words a toy model uses, from its flow error under changed captions."""

import json

import pytest
import torch

from eval import toy_words
from hiar.captions import parse_caption, template_caption
from hiar.checkpoints import save_model
from hiar.codecs import build_codec, rendered_frames
from hiar.config import load_config
from hiar.text import MiniLMEncoder, PromptBank
from hiar.toyfidelity import held_out_clips
from hiar.toyworld import BACKGROUNDS, OBJECT_COLOURS, SHAPES, sample_clip
from hiar.toywords import KINDS, OPPOSITE, changed, swapped, word_use
from conftest import random_model


@pytest.mark.parametrize("kind", KINDS)
def test_a_changed_caption_changes_every_word_of_its_kind_and_nothing_else(kind):
    for i in range(60):
        spec = sample_clip(7, i).spec()
        new = changed(spec, kind)
        assert parse_caption(template_caption(new)) == new  # still a caption of the world
        if kind == "background":
            assert new["background"] != spec["background"] and new["background"] in BACKGROUNDS
            assert new["objects"] == spec["objects"]
            continue
        assert new["background"] == spec["background"]
        for old, o in zip(spec["objects"], new["objects"]):
            assert o[kind] != old[kind] and {k: v for k, v in o.items() if k != kind} == \
                {k: v for k, v in old.items() if k != kind}
        if kind == "colour":  # objects stay told apart by colour, as in the world
            assert all(o["colour"] in OBJECT_COLOURS for o in new["objects"])
            assert len({o["colour"] for o in new["objects"]}) == len(new["objects"])
        if kind == "shape":
            assert all(o["shape"] in SHAPES for o in new["objects"])
        if kind == "direction":  # the same axis, the other way
            assert all(o["direction"] == OPPOSITE[old["direction"]] for old, o in zip(spec["objects"], new["objects"]))


def test_swapped_exchanges_two_objects_directions_and_nothing_else():
    exchanged = 0
    for i in range(60):
        spec = sample_clip(7, i).spec()
        new = swapped(spec)
        assert parse_caption(template_caption(new)) == new
        if len(spec["objects"]) == 1 or spec["objects"][0]["direction"] == spec["objects"][1]["direction"]:
            assert new == spec
            continue
        exchanged += 1
        (a, b), (a2, b2) = spec["objects"], new["objects"]
        assert (a2["direction"], b2["direction"]) == (b["direction"], a["direction"])
        assert {k: v for k, v in a2.items() if k != "direction"} == {k: v for k, v in a.items() if k != "direction"}
        assert sorted(template_caption(new).split()) == sorted(template_caption(spec).split())  # the same words
    assert exchanged > 10


class Blind(torch.nn.Module):
    """A model that never reads its caption."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, t, text, attention):
        return self.model(x, t, torch.zeros_like(text), attention)


def test_a_model_that_ignores_its_caption_pays_nothing_for_a_changed_word():
    cfg = load_config("tiny", ["model.text_len=32"])  # tiny's 8 tokens would cut the background off
    codec, bank = build_codec(cfg, "cpu"), PromptBank.for_config(cfg, torch.device("cpu"))
    clips = held_out_clips(6, cfg.video.height, cfg.video.width)  # two of them: two objects going two ways
    model = random_model(cfg)
    args = (codec, bank, clips, rendered_frames(cfg), "", (0.3, 0.8))
    blind = word_use(Blind(model), *args, batch_size=4)
    assert blind["two_way_clips"] == 2
    ignored = [*KINDS, "none", "swapped", "direction_two_ways"]
    assert all(blind["penalty"][k] == 0.0 for k in ignored)  # the same noise: errors equal to the bit
    assert blind["penalty"]["shuffled"] != 0.0  # frame order is not a word: a blind model still sees it
    reading = word_use(model, *args, batch_size=4)  # a model that reads its caption: each word moves its error
    assert all(reading["penalty"][k] != 0.0 for k in [*KINDS, "swapped", "direction_two_ways"])


class WrongOnContext(torch.nn.Module):
    """The model, but its flow on the first `frames` latent frames is far off."""

    def __init__(self, model, frames):
        super().__init__()
        self.model, self.frames = model, frames

    def forward(self, x, t, text, attention):
        out = self.model(x, t, text, attention).clone()
        out[:, :self.frames] += 100.0
        return out


def test_a_context_probe_scores_only_the_frames_after_the_context():
    cfg = load_config("tiny", ["model.text_len=32"])
    codec, bank = build_codec(cfg, "cpu"), PromptBank.for_config(cfg, torch.device("cpu"))
    clips = held_out_clips(3, cfg.video.height, cfg.video.width)
    model = random_model(cfg)
    args = (codec, bank, clips, rendered_frames(cfg), "", (0.5,))
    plain = word_use(model, *args, context=3)
    assert plain["context"] == 3
    assert word_use(WrongOnContext(model, 3), *args, context=3)["error"] == plain["error"]  # never scored
    assert word_use(WrongOnContext(model, 3), *args)["error"]["caption"][0] > 100  # scored without context
    blind = word_use(Blind(model), *args, context=3)
    assert all(blind["penalty"][k] == 0.0 for k in [*KINDS, "none"])
    seen = []
    model.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[1]))
    word_use(model, *args, context=3)
    assert all(torch.equal(t[:, :3], torch.full_like(t[:, :3], 50.0)) and (t[:, 3:] == 500.0).all() for t in seen)


def test_the_program_writes_its_result_and_refuses_a_missing_checkpoint(tmp_path, capsys):
    cfg = load_config("tiny")
    path = save_model(random_model(cfg), cfg, tmp_path / "teacher.safetensors")
    result = toy_words.main(["--checkpoint", str(path), "--num_clips", "2", "--out", str(tmp_path / "words.json"),
                             "--device", "cpu"])
    assert json.loads((tmp_path / "words.json").read_text())["penalty"] == result["penalty"]
    assert set(result["error"]) == {"caption", *KINDS, "none", "swapped", "shuffled"} and result["clips"] == 2
    with pytest.raises(SystemExit) as exit_info:
        toy_words.main(["--checkpoint", str(tmp_path / "nothing.safetensors")])
    assert exit_info.value.code == 2 and "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        toy_words.main(["--checkpoint", str(path), "--context", str(cfg.video.num_latent_frames)])
    assert exit_info.value.code == 2 and "at least one must be scored" in capsys.readouterr().err


def test_the_encoder_probe_tells_bound_states_from_a_set():
    """scripts/encoder_binding_probe.py: on made-up word states that carry their own object's direction
    the probe names it; on states that carry both objects' directions alike it names each half the time.
    And on MiniLM's real states it reads one state per object's word, each caption's own."""
    from scripts.encoder_binding_probe import NAMES, binding, two_way_scenes, word_states

    generator = torch.Generator().manual_seed(0)

    def states(specs: list[dict], bound: bool) -> list[dict]:
        def onehot(direction: str) -> torch.Tensor:
            return torch.eye(4)[NAMES["direction"].index(direction)]

        out = []
        for spec in specs:
            a, b = (onehot(o["direction"]) for o in spec["objects"])
            words = [a, b] if bound else [a + b, a + b]
            out.append({"colour": [w + 0.1 * torch.randn(4, generator=generator) for w in words]})
        return out

    train, test = two_way_scenes(400, 0), two_way_scenes(200, 1)
    own, other = binding((train, states(train, True)), (test, states(test, True)), "colour", "direction")
    assert own > 0.95 and other < 0.05
    own, other = binding((train, states(train, False)), (test, states(test, False)), "colour", "direction")
    assert 0.3 < own < 0.7 and 0.3 < other < 0.7 and own + other > 0.95

    captions = ["a red circle moving left and a blue square moving up on a black background",
                "a blue square moving up and a red circle moving left on a black background"]
    read = word_states(MiniLMEncoder(text_len=64), captions, layer=-1)
    assert all(len(read[i][kind]) == 2 for i in range(2) for kind in ("colour", "shape", "direction"))
    # the same words in another order and context: the red word's state changes with it
    assert not torch.allclose(read[0]["colour"][0], read[1]["colour"][1], atol=1e-3)
