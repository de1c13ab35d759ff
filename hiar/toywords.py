"""Which words of a toy caption does a model use? (eval.toy_words)

Sampling and measuring a video (hiar.toyfidelity) says whether a model draws its prompt, but a miss
there mixes three causes: the model ignores the word, the sampler loses what it knows, or the
measurement misreads the frames. This asks the model alone. Each held-out clip is scored by its
flow-matching error (`hiar.toyteacher.flow_errors`, at fixed noise and fixed levels) under its own
caption and under captions with one kind of word changed: every object's colour, shape or direction,
or the background. A model that uses a kind of word predicts the clip's flow worse under the changed
caption; one that ignores it predicts it exactly as well. Each kind's penalty is the relative rise of
the error pooled over noise levels: 0 means the model ignores that kind of word. A wrong word can cost
more than no caption at all (the negative prompt, reported beside): it points the model elsewhere.
A control asks whether the model knows frame order at all: the clip's own caption with its frames
shuffled ("shuffled", one fixed permutation). A model that ignores the direction word but pays for
shuffled frames knows time and does not tie it to the caption. A second control asks whether it knows
whose direction is whose: in scenes of two objects going two ways, the caption with their directions
exchanged ("swapped": the same words, bound the other way round), against the same clips' penalty for
both directions reversed ("direction_two_ways"). A model that moves both objects by the scene's words,
not each by its own, pays for the reversal and not for the exchange.

With `context` the first latent frames are given nearly clean (level CONTEXT_LEVEL) and only the rest
are scored: where the objects are is then known, and only the direction word (and the motion the
model infers) says where they go next. It is the causal student's situation after its first block,
and where the direction word is worth most to the loss.

The changed word is always another of the world's: the next colour in the palette not already in the
scene, the next shape, the opposite direction (the same axis, so only the sign of the motion differs),
the next background.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from hiar.captions import template_caption
from hiar.codecs import Codec
from hiar.flow import CONTEXT_LEVEL, FlowMatching
from hiar.text import PromptBank
from hiar.toyteacher import encode_clips, flow_errors
from hiar.toyworld import BACKGROUNDS, OBJECT_COLOURS, SHAPES, ToyClip

KINDS = ("colour", "shape", "direction", "background")
OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}
LEVELS = (0.1, 0.3, 0.5, 0.7, 0.9)  # noise levels sigma the errors are taken at


def _next(names: Sequence[str], name: str, taken: set[str] = frozenset()) -> str:
    i = list(names).index(name)
    return next(n for n in [*names[i + 1:], *names[:i]] if n not in taken)


def changed(spec: dict, kind: str) -> dict:
    """The scene spec with every word of `kind` changed to another of the world's (module docstring)."""
    if kind == "background":
        return {**spec, "background": _next(list(BACKGROUNDS), spec["background"])}
    objects = []
    for o in spec["objects"]:
        if kind == "colour":
            taken = {p["colour"] for p in spec["objects"]} | {p["colour"] for p in objects}
            new = _next(list(OBJECT_COLOURS), o["colour"], taken)
        elif kind == "shape":
            new = _next(SHAPES, o["shape"])
        elif kind == "direction":
            new = OPPOSITE[o["direction"]]
        else:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        objects.append({**o, kind: new})
    return {**spec, "objects": objects}


def swapped(spec: dict) -> dict:
    """The scene with its two objects' directions exchanged (unchanged for a lone object; the toy world's
    scenes hold one or two)."""
    if len(spec["objects"]) != 2:
        return spec
    a, b = spec["objects"]
    return {**spec, "objects": [{**a, "direction": b["direction"]}, {**b, "direction": a["direction"]}]}


def _shuffled(n: int, seed: int) -> torch.Tensor:
    """A fixed permutation of n frames, never the identity (n > 1)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 1))
    return order.flip(0) if n > 1 and torch.equal(order, torch.arange(n)) else order


@torch.no_grad()
def word_use(model: torch.nn.Module, codec: Codec, bank: PromptBank, clips: Sequence[ToyClip], frames: int,
             negative: str, levels: Sequence[float] = LEVELS, batch_size: int = 8, seed: int = 0,
             context: int = 0) -> dict:
    """Mean flow error of the clips (their first `frames` video frames) under their template captions
    ("caption"), each kind changed, the negative prompt ("none"), two objects' directions exchanged
    ("swapped") and with their latent frames shuffled ("shuffled"), by level; and the penalty of each
    (module docstring), "swapped" and "direction_two_ways" over the clips whose exchange changes the
    caption. The same noise for every caption, so the penalties are paired differences, not noise. With
    `context`, that many latent frames are given at CONTEXT_LEVEL and the levels and the error are the
    other frames'."""
    captions = {"caption": [template_caption(c.spec()) for c in clips],
                **{kind: [template_caption(changed(c.spec(), kind)) for c in clips] for kind in KINDS},
                "none": [negative] * len(clips), "swapped": [template_caption(swapped(c.spec())) for c in clips]}
    two_ways = torch.tensor([s != c for s, c in zip(captions["swapped"], captions["caption"])])
    flow = FlowMatching(1.0)  # the levels are given: no shift
    per_clip = {name: torch.zeros(len(clips), len(levels), dtype=torch.float64) for name in [*captions, "shuffled"]}
    generator, device = torch.Generator().manual_seed(seed), next(model.parameters()).device
    for start in range(0, len(clips), batch_size):
        x0 = encode_clips(codec, clips[start:start + batch_size], frames).to(device)
        inputs = {name: (x0, bank(texts[start:start + batch_size])) for name, texts in captions.items()}
        inputs["shuffled"] = (x0[:, _shuffled(x0.shape[1], seed)], inputs["caption"][1])
        for i, level in enumerate(levels):
            noise = torch.randn(x0.shape, generator=generator).to(device)
            sigma = torch.full(x0.shape[:2], float(level), device=device)
            sigma[:, :context] = CONTEXT_LEVEL
            for name, (x, text) in inputs.items():
                errors = flow_errors(model, x, text, flow, sigma, noise, scored=slice(context, None))
                per_clip[name][start:start + batch_size, i] = errors.double().cpu()
    error = {name: e.mean(0).tolist() for name, e in per_clip.items()}

    def pooled(name: str, among: torch.Tensor | slice = slice(None)) -> float:  # over levels and the clips `among`
        return float(per_clip[name][among].sum())

    penalty = {name: pooled(name) / pooled("caption") - 1 for name in [*KINDS, "none", "shuffled"]}
    if two_ways.any():
        penalty |= {"swapped": pooled("swapped", two_ways) / pooled("caption", two_ways) - 1,
                    "direction_two_ways": pooled("direction", two_ways) / pooled("caption", two_ways) - 1}
    return {"levels": list(levels), "context": context, "clips": len(clips), "two_way_clips": int(two_ways.sum()),
            "error": error, "penalty": penalty}
