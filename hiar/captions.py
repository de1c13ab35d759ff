"""What the toy world's captions say and the many ways of saying it.

A scene spec is `{"background": name, "objects": [{"colour", "shape", "direction"}, ...]}` in the
canonical names of `hiar.toyworld` (its palettes, SHAPES, DIRECTIONS; tests/test_captions.py checks the
keys below against them). Three styles phrase a spec:

* "template": "a red circle moving left on a dark blue background", the one sentence every toy
  checkpoint so far was trained on (byte-identical to the captions of the first datasets);
* "varied": the training generator: synonyms of every colour, shape, direction and background, six
  sentence forms, four object forms, optional extra words (a lead-in, adjectives, adverbs, a tail),
  capitalisation and a full stop;
* "held_out": phrasings for evaluation only, written separately. Every one uses a motion verb and a
  sentence form the training generator never emits (`HELD_OUT_VERBS` are outside its vocabulary), so a
  held-out caption is never a training caption; the attribute words (colours, shapes, directions,
  backgrounds and their synonyms) are the training ones, so what is held out is the phrasing, not the
  vocabulary.

Phrasing is a pure function of (spec, style, key). `parse_caption` maps any of them, and free text that
names the world's words, back to the spec.
"""

from __future__ import annotations

import random
import re

# Synonyms by canonical name; the first is the canonical word itself. Background phrases never share
# their longest match with an object colour ("deep blue" is a background, "blue" an object), so a
# caption's words say unambiguously which colour is the background.
COLOUR_WORDS = {
    "red": ("red", "crimson", "scarlet"), "green": ("green", "emerald", "leaf green"),
    "blue": ("blue", "azure", "cobalt"), "yellow": ("yellow", "golden", "lemon"),
    "white": ("white", "snowy", "ivory"), "orange": ("orange", "amber", "tangerine"),
    "purple": ("purple", "violet", "mauve"), "cyan": ("cyan", "turquoise", "aqua"),
}
BACKGROUND_WORDS = {
    "black": ("black", "jet black", "pitch black"), "dark blue": ("dark blue", "navy", "deep blue", "midnight blue"),
    "dark gray": ("dark gray", "dark grey", "charcoal"), "dark green": ("dark green", "deep green", "forest green"),
    "dark purple": ("dark purple", "deep purple", "plum"),
}
SHAPE_WORDS = {"circle": ("circle", "disc", "ball"), "square": ("square", "box", "block"),
               "triangle": ("triangle", "wedge")}
DIRECTION_WORDS = {
    "left": ("left", "to the left", "leftward", "leftwards"),
    "right": ("right", "to the right", "rightward", "rightwards"),
    "up": ("up", "upward", "upwards", "to the top"), "down": ("down", "downward", "downwards", "to the bottom"),
}
CAPTION_STYLES = ("template", "varied", "held_out")

# -- the template ---------------------------------------------------------------------------------------


def _a(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def template_caption(spec: dict) -> str:
    """'a red circle moving left and ... on a dark blue background': the toy world's first caption."""
    things = " and ".join(f"{_a(o['colour'])} {o['colour']} {o['shape']} moving {o['direction']}"
                          for o in spec["objects"])
    return f"{things} on a {spec['background']} background"


# -- the training generator -----------------------------------------------------------------------------

_VERBS = ("moving", "going", "sliding")
_VERBS_3RD = ("moves", "goes", "slides")  # after "that" / "which"
_ADJECTIVES = ("small", "little", "solid", "flat", "single")
_ADVERBS = ("steadily", "slowly", "smoothly")
_LEAD_INS = ("a video of", "an animation of", "a clip of", "footage of")
# Nothing about what happens at a border: the world may bounce or wrap (hiar.toyworld.Motion).
_TAILS = ("in flat colours", "in a simple animation", "2d animation")
_JOINS = (" and ", ", and ", " while ", "; ")


def _maybe(rng: random.Random, p: float, word: str) -> str:
    return f"{word} " if rng.random() < p else ""


def _varied_object(o: dict, rng: random.Random) -> str:
    colour, shape = rng.choice(COLOUR_WORDS[o["colour"]]), rng.choice(SHAPE_WORDS[o["shape"]])
    direction = rng.choice(DIRECTION_WORDS[o["direction"]])
    adjective = _maybe(rng, 0.3, rng.choice(_ADJECTIVES))
    adverb = _maybe(rng, 0.2, rng.choice(_ADVERBS))
    form = rng.randrange(4)
    if form == 0:
        head = f"{adjective}{colour} {shape} {rng.choice(_VERBS)} {adverb}{direction}"
    elif form == 1:
        that = rng.choice(("that", "which"))
        head = f"{adjective}{colour} {shape} {that} {rng.choice(_VERBS_3RD)} {adverb}{direction}"
    elif form == 2:  # the colour after the shape
        head = f"{adjective}{shape}, {colour}, {rng.choice(_VERBS)} {adverb}{direction}"
    else:  # the adverb before the verb
        head = f"{adjective}{colour} {shape} {adverb}{rng.choice(_VERBS)} {direction}"
    return f"{_a(head)} {head}"


# Where the background goes; "{lead}" only where the objects open the sentence.
_VARIED_SCENES = ("{lead}{things} on {a} {background} background", "{lead}{things} against {a} {background} backdrop",
                  "{background} background, {things}", "on {a} {background} background, {things}",
                  "{lead}{things}; the background is {background}", "{lead}{things} over {a} {background} background")


def _varied_scene(things: str, background: str, rng: random.Random) -> str:
    lead = f"{rng.choice(_LEAD_INS)} " if rng.random() < 0.3 else ""
    return rng.choice(_VARIED_SCENES).format(lead=lead, things=things, a=_a(background), background=background)


def _finish(sentence: str, rng: random.Random) -> str:
    if rng.random() < 0.2:
        sentence = f"{sentence}, {rng.choice(_TAILS)}"
    if rng.random() < 0.3:
        sentence = sentence[0].upper() + sentence[1:]
    return sentence + ("." if rng.random() < 0.3 else "")


def varied_caption(spec: dict, rng: random.Random) -> str:
    things = rng.choice(_JOINS).join(_varied_object(o, rng) for o in spec["objects"])
    return _finish(_varied_scene(things, rng.choice(BACKGROUND_WORDS[spec["background"]]), rng), rng)


# -- the held-out phrasings (evaluation only) --------------------------------------------------------------

# Motion verbs the training generator never uses; each held-out object phrase has one, so no held-out
# caption can be a training caption.
HELD_OUT_VERBS = ("heading", "gliding", "drifting", "floating", "travelling", "cruising")


def _held_out_object(o: dict, rng: random.Random, first: bool) -> str:
    colour, shape = rng.choice(COLOUR_WORDS[o["colour"]]), rng.choice(SHAPE_WORDS[o["shape"]])
    direction, verb = rng.choice(DIRECTION_WORDS[o["direction"]]), rng.choice(HELD_OUT_VERBS)
    form = rng.randrange(4)
    if form == 0:
        return f"{_a(colour)} {colour} {shape} {verb} {direction}"
    if form == 1:  # the motion first: "gliding to the left is a red circle"
        return f"{verb} {direction} is {_a(colour)} {colour} {shape}"
    if form == 2:
        return f"{_a(shape)} {shape} in {colour}, {verb} {direction}"
    return f"{'there is' if first else 'also'} {_a(colour)} {colour} {shape} {verb} {direction}"


_HELD_OUT_SCENES = ("{things}, in front of {a} {background} wall", "{a} {background} scene: {things}",
                    "{things} across a plain {background} canvas", "everything is {background} except {things}")


def held_out_caption(spec: dict, rng: random.Random) -> str:
    things = rng.choice((" together with ", ", meanwhile ", " as well as ")).join(
        _held_out_object(o, rng, i == 0) for i, o in enumerate(spec["objects"]))
    background = rng.choice(BACKGROUND_WORDS[spec["background"]])
    return rng.choice(_HELD_OUT_SCENES).format(things=things, a=_a(background), background=background)


def phrase(spec: dict, style: str, key: int | str) -> str:
    """The caption of `spec` in `style`, a pure function of (spec, style, key): the same key gives the
    same words, another key (a later epoch, another sample) other words."""
    if style == "template":
        return template_caption(spec)
    rng = random.Random(f"captions/{style}/{key}/{template_caption(spec)}")
    if style == "varied":
        return varied_caption(spec, rng)
    if style == "held_out":
        return held_out_caption(spec, rng)
    raise ValueError(f"caption style {style!r}: expected one of {CAPTION_STYLES}")


# -- reading a caption back --------------------------------------------------------------------------------

# (tokens of a phrase) -> (kind, canonical name), matched longest first
_LEXICON = {tuple(word.split()): (kind, name)
            for kind, table in (("colour", COLOUR_WORDS), ("background", BACKGROUND_WORDS), ("shape", SHAPE_WORDS),
                                ("direction", DIRECTION_WORDS))
            for name, words in table.items() for word in words}
_LONGEST = max(len(k) for k in _LEXICON)
_WORD = re.compile(r"[a-z]+")  # a caption's words, lower-cased: punctuation and hyphens split them


def phrase_spans(caption: str) -> list[tuple[str, str, int, int]]:
    """The world's phrases in a caption, in order: (kind, canonical name, start, end) with the phrase at
    caption[start:end]; case and punctuation ignored, the longest match first."""
    words = [(m.group(), m.start(), m.end()) for m in _WORD.finditer(caption.lower())]
    found, i = [], 0
    while i < len(words):
        for n in range(min(_LONGEST, len(words) - i), 0, -1):
            hit = _LEXICON.get(tuple(w for w, _, _ in words[i:i + n]))
            if hit:
                found.append((*hit, words[i][1], words[i + n - 1][2]))
                i += n
                break
        else:
            i += 1
    return found


def parse_caption(caption: str) -> dict | None:
    """Any phrasing of a toy scene -> its spec, or None when the caption does not name one.

    The caption's colour, shape, direction and background words (any synonym above) are read in
    order; the i-th colour, shape and direction belong to the i-th object (every style lists each
    object's words before the next object's, "respectively" included). A caption names a scene when it
    has exactly one background and as many colours and directions as shapes (at least one).
    """
    found: dict[str, list[str]] = {"colour": [], "background": [], "shape": [], "direction": []}
    for kind, name, _, _ in phrase_spans(caption):
        found[kind].append(name)
    colours, shapes, directions = found["colour"], found["shape"], found["direction"]
    if len(found["background"]) != 1 or not shapes or not len(colours) == len(directions) == len(shapes):
        return None
    return {"background": found["background"][0],
            "objects": [{"colour": c, "shape": s, "direction": d} for c, s, d in zip(colours, shapes, directions)]}


def redirected(caption: str, directions: list[str]) -> str:
    """The caption with its i-th direction phrase naming directions[i] instead, in the same synonym slot
    ("to the left" -> "to the right", "leftward" -> "rightward") and every other character kept: captions
    that differ in whose direction is whose and in nothing else, whatever the phrasing (the binding
    probes of scripts/direction_word_diagnostic.py)."""
    spans = [(name, start, end) for kind, name, start, end in phrase_spans(caption) if kind == "direction"]
    if len(spans) != len(directions):
        raise ValueError(f"{caption!r} names {len(spans)} directions, not {len(directions)}")
    for (name, start, end), new in reversed(list(zip(spans, directions))):  # from the end: spans stay valid
        old = " ".join(_WORD.findall(caption[start:end].lower()))  # "To-the left" -> "to the left"
        word = DIRECTION_WORDS[new][DIRECTION_WORDS[name].index(old)]
        caption = caption[:start] + (word.capitalize() if caption[start].isupper() else word) + caption[end:]
    return caption
