"""Captions of the toy world: the template unchanged, the varied generator's variety, the held-out
phrasings disjoint from it, and every phrasing read back to its scene."""

import hashlib
import re

import pytest

from hiar.captions import (BACKGROUND_WORDS, COLOUR_WORDS, DIRECTION_WORDS, HELD_OUT_VERBS, SHAPE_WORDS, parse_caption,
                           phrase, redirected)
from hiar.toyworld import BACKGROUNDS, DIRECTIONS, OBJECT_COLOURS, SHAPES, ToyClip, ToyObject, sample_clip

TABLES = {"colour": COLOUR_WORDS, "background": BACKGROUND_WORDS, "shape": SHAPE_WORDS, "direction": DIRECTION_WORDS}


def words(caption: str) -> set[str]:
    return set(re.sub(r"[^a-z]+", " ", caption.lower()).split())


def test_the_template_is_the_first_datasets_caption_byte_for_byte():
    # sha256 of these 900 captions as hiar.toyworld wrote them before hiar.captions existed (commit 3b10347):
    # data, ODE pairs and checkpoints trained on them stay valid
    text = "".join(sample_clip(seed, i).caption + "\n" for seed in (0, 1, 424242) for i in range(300))
    digest = "2886e1326edbf5b0c660379cf356d2c3a6b742396aa3689de497b12a9cfeb699"
    assert hashlib.sha256(text.encode()).hexdigest() == digest
    clip = sample_clip(0, 0)
    assert phrase(clip.spec(), "template", 7) == clip.caption == \
        "an orange square moving left and a blue triangle moving down on a dark green background"


def test_vocabulary_names_exactly_the_worlds_things_and_no_phrase_twice():
    assert set(COLOUR_WORDS) == set(OBJECT_COLOURS) and set(BACKGROUND_WORDS) == set(BACKGROUNDS)
    assert set(SHAPE_WORDS) == set(SHAPES) and set(DIRECTION_WORDS) == set(DIRECTIONS)
    for table in TABLES.values():
        assert all(words_[0] == name for name, words_ in table.items())  # the canonical word is a synonym
    phrases = [w for table in TABLES.values() for ws in table.values() for w in ws]
    assert len(phrases) == len(set(phrases))  # one meaning a phrase: the parser's lexicon loses nothing


def test_phrasing_is_seeded_deterministic_and_varied():
    spec = sample_clip(5, 3).spec()
    for style in ("varied", "held_out"):
        assert phrase(spec, style, "k") == phrase(spec, style, "k")
        assert len({phrase(spec, style, k) for k in range(40)}) >= 30
    assert phrase(spec, "varied", 1) != phrase(sample_clip(5, 4).spec(), "varied", 1)
    with pytest.raises(ValueError, match="caption style 'poem'"):
        phrase(spec, "poem", 0)


def test_the_varied_generator_uses_every_synonym():
    captions = [phrase(sample_clip(9, i).spec(), "varied", i) for i in range(3000)]
    text = " | ".join(c.lower() for c in captions)
    for table in TABLES.values():
        for ws in table.values():
            for w in ws:
                assert re.search(rf"\b{w}\b", text), w
    assert sum(c[0].isupper() for c in captions) > 500 and sum(c.endswith(".") for c in captions) > 500
    assert len(set(captions)) == len(captions)


def test_held_out_phrasings_are_never_training_phrasings():
    train = [phrase(sample_clip(seed, i).spec(), style, i) for seed in (0, 1) for i in range(10_000)
             for style in ("template", "varied")]
    vocabulary = set().union(*map(words, train))
    assert not vocabulary & set(HELD_OUT_VERBS)
    held_out = [phrase(sample_clip(424242, i).spec(), "held_out", f"424242/{i}") for i in range(3000)]
    assert all(words(c) - vocabulary for c in held_out)  # every one has a word training never shows
    assert not set(held_out) & set(train)
    # what is held out is the phrasing: the held-out set names things with every training synonym
    text = " | ".join(held_out)
    assert all(re.search(rf"\b{w}\b", text) for table in TABLES.values() for ws in table.values() for w in ws)


@pytest.mark.parametrize("style", ["template", "varied", "held_out"])
def test_every_phrasing_reads_back_to_its_scene(style):
    for i in range(2000):
        clip = sample_clip(11, i)
        caption = phrase(clip.spec(), style, i)
        assert parse_caption(caption) == clip.spec(), caption


def test_free_text_parses_when_it_names_a_scene():
    assert parse_caption("A cat sitting on a windowsill") is None
    assert parse_caption("a red circle moving left") is None  # no background
    assert parse_caption("a red circle moving left on a black and navy background") is None  # two
    assert parse_caption("a red circle and a blue square on a black background") is None  # no directions
    assert parse_caption("A scarlet ball and a cobalt box drifting left and up respectively, on navy!") == {
        "background": "dark blue", "objects": [{"colour": "red", "shape": "circle", "direction": "left"},
                                               {"colour": "blue", "shape": "square", "direction": "up"}]}
    # the longest phrase wins: "deep blue" is a background, "blue" an object
    assert parse_caption("a blue wedge moving to the top over deep blue")["background"] == "dark blue"
    clip = ToyClip("dark purple", (ToyObject("triangle", "white", 6, 30, 30, "right", 1.0),))
    assert parse_caption(clip.caption) == clip.spec()


@pytest.mark.parametrize("style", ["template", "varied", "held_out"])
def test_redirected_changes_the_directions_and_no_other_word(style):
    for i in range(300):
        spec = sample_clip(12, i).spec()
        caption = phrase(spec, style, i)
        new = [d for d in DIRECTIONS if d not in {o["direction"] for o in spec["objects"]}][:len(spec["objects"])]
        moved = redirected(caption, new)
        objects = [{**o, "direction": d} for o, d in zip(spec["objects"], new)]
        assert parse_caption(moved) == {**spec, "objects": objects}
        kept = words(caption) - {w for ws in DIRECTION_WORDS.values() for p in ws for w in p.split()}
        assert kept <= words(moved) and redirected(moved, [o["direction"] for o in spec["objects"]]) == caption
    assert redirected("A red ball going to-the left, on navy", ["down"]) == "A red ball going downward, on navy"
    with pytest.raises(ValueError, match="names 1 directions, not 2"):
        redirected("a red circle moving left on a black background", ["up", "down"])
