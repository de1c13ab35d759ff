"""Does the toy text encoder say whose direction is whose? A diagnostic, not part of the recipe.

The toy teacher moves two objects by their caption's directions as a set, not each by its own
(docs/toy_prompts.md, "Where the direction word is lost"). It reads the caption only through its text
encoder's token states (all-MiniLM-L6-v2, `hiar.text.MiniLMEncoder`), by cross-attention. If the state
of an object's colour or shape word carries that object's direction (or the state of a direction word
its object's colour), one attention step binds them; if it carries both objects' directions alike, the
DiT has to bind them itself, by where the words stand.

This asks the states with linear probes, on scenes of two objects going two different ways, captioned
in one style (`hiar.captions.phrase`): fit on --train captions, scored on --test others. For the
state at each object's colour word, shape word and direction word (the mean over the phrase's tokens,
`hiar.captions.phrase_spans`), it reports how often the probe names that object's own direction (or
colour) and how often the other object's: a state that binds scores near 100% / 0%, one that holds the
two as a set near 50% / 50% (chance for a direction 25%, a colour 12.5%).

    .venv/bin/python scripts/encoder_binding_probe.py template varied held_out        # about 2 min
    .venv/bin/python scripts/encoder_binding_probe.py varied --layer 3
"""

from __future__ import annotations

import argparse
import random
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hiar.captions import phrase, phrase_spans  # noqa: E402
from hiar.text import MiniLMEncoder  # noqa: E402
from hiar.toyworld import BACKGROUNDS, DIRECTIONS, OBJECT_COLOURS, SHAPES  # noqa: E402

# (the word whose state is read, the attribute of its own object the probe names)
PROBES = (("colour", "direction"), ("shape", "direction"), ("direction", "colour"))
NAMES = {"direction": list(DIRECTIONS), "colour": sorted(OBJECT_COLOURS)}


def two_way_scenes(n: int, seed: int) -> list[dict]:
    """n scene specs of two objects with different colours going different directions."""
    rng = random.Random(seed)
    return [{"background": rng.choice(sorted(BACKGROUNDS)),
             "objects": [{"colour": c, "shape": rng.choice(SHAPES), "direction": d}
                         for c, d in zip(rng.sample(NAMES["colour"], 2), rng.sample(NAMES["direction"], 2))]}
            for _ in range(n)]


@torch.no_grad()
def word_states(encoder: MiniLMEncoder, captions: Sequence[str], layer: int,
                batch_size: int = 64) -> list[dict[str, list[torch.Tensor]]]:
    """For each caption, each kind of word -> the states [D] of its phrases in order (object i's is the
    i-th), read from MiniLM's hidden states after `layer` (-1: the last, what the toy models hear)."""
    out = []
    for start in range(0, len(captions), batch_size):
        chunk = list(captions[start:start + batch_size])
        tokens = encoder.tokenizer(chunk, padding=True, return_offsets_mapping=True, return_tensors="pt")
        offsets = tokens.pop("offset_mapping")
        states = encoder.model(**tokens, output_hidden_states=True).hidden_states[layer]
        for b, caption in enumerate(chunk):
            words: dict[str, list[torch.Tensor]] = {kind: [] for kind, _ in PROBES}
            for kind, _, begin, end in phrase_spans(caption):
                if kind in words:  # the tokens inside the phrase (special and padding tokens are empty)
                    first, last = offsets[b, :, 0], offsets[b, :, 1]
                    inside = (first >= begin) & (last <= end) & (last > first)
                    words[kind].append(states[b, inside].mean(0))
            out.append(words)
    return out


def linear_probe(x: torch.Tensor, y: Sequence[int], classes: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Multinomial logistic regression on standardised features (L-BFGS, a little weight decay): the
    function from features [N, D] to the classes [N] it names."""
    mean, std = x.mean(0), x.std(0) + 1e-6
    weight = torch.zeros(x.shape[1], classes, requires_grad=True)
    bias = torch.zeros(classes, requires_grad=True)
    optimiser, target, z = torch.optim.LBFGS([weight, bias], max_iter=200), torch.tensor(list(y)), (x - mean) / std

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        loss = torch.nn.functional.cross_entropy(z @ weight + bias, target) + 1e-3 * weight.square().sum()
        loss.backward()
        return loss

    optimiser.step(closure)
    return lambda features: (((features - mean) / std) @ weight + bias).argmax(1)


def binding(train: tuple[list[dict], list[dict]], test: tuple[list[dict], list[dict]], word: str,
            attribute: str) -> tuple[float, float]:
    """Fit a probe from the state of each object's `word` to that object's `attribute` on `train`
    (specs, word_states), and return on `test` the share it gives the object's own and the other's."""
    names = NAMES[attribute]

    def rows(specs: list[dict], states: list[dict]) -> tuple[torch.Tensor, list[int], list[int]]:
        x, own, other = [], [], []
        for spec, words in zip(specs, states):
            for i, o in enumerate(spec["objects"]):
                x.append(words[word][i])
                own.append(names.index(o[attribute]))
                other.append(names.index(spec["objects"][1 - i][attribute]))
        return torch.stack(x), own, other

    x, own, _ = rows(*train)
    predict = linear_probe(x, own, len(names))
    x, own, other = rows(*test)
    named = predict(x).tolist()
    return (sum(p == o for p, o in zip(named, own)) / len(own), sum(p == o for p, o in zip(named, other)) / len(own))


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("styles", nargs="+", choices=["template", "varied", "held_out"])
    p.add_argument("--layer", type=int, default=-1, help="MiniLM's hidden states after this layer (0: embeddings)")
    p.add_argument("--train", type=int, default=1500, help="training captions (two objects each)")
    p.add_argument("--test", type=int, default=500, help="test captions, other scenes and phrasings")
    args = p.parse_args(argv)
    encoder = MiniLMEncoder(text_len=64)
    for style in args.styles:
        sets = []
        for seed, n in ((0, args.train), (1, args.test)):
            specs = two_way_scenes(n, seed)
            captions = [phrase(s, style, f"probe/{seed}/{i}") for i, s in enumerate(specs)]
            sets.append((specs, word_states(encoder, captions, args.layer)))
        for word, attribute in PROBES:
            own, other = binding(*sets, word, attribute)
            print(f"{style:9s} layer {args.layer}: the {word} word's state names its object's {attribute} {own:.1%}, "
                  f"the other object's {other:.1%} ({len(sets[1][0]) * 2} objects)", flush=True)


if __name__ == "__main__":
    main()
