"""The questions a world scene (world.py) answers, one skill at a time; every answer is computed from the scene.

    count                   "how many shapes / red shapes / stars are there?" -> "0".."6"
    relation (yes/no)       "is the red star left of the blue circle?" -> yes/no (only for pairs clearly apart):
                            two named things' positions compared; up to three a scene, on different ordered pairs
    relation (which)        "what is left of the blue circle?" -> "red star" (only when exactly one thing is, so
                            it is also the leftmost thing: a different, easier skill, scored apart)
    binding                 "what color is the triangle?" / "what is the red shape?" among distractors
    existence (random)      yes for a present pair; no for a pair whose colour and kind are both absent
    existence (popular)     no for an absent pair sharing its colour or its kind with something present
    existence (adversarial) no for an absent pair whose colour and kind are both present, on different things
    reading                 "what word is written in the image?"
    caption                 "describe the image." -> world.caption
Existence questions come in pairs (one yes, one no) per setting, so each setting's accuracy is balanced, as in POPE.
Training scenes (`training=True`) ask their yes/no relations about pairs clearly apart (over CLEAR of the canvas
along the asked axis) first; the test scenes about any pair over APART, as above. No training question names a
held-out colour-kind pair (world.HELD_OUT): those names are first read in the test scenes.
"""

from __future__ import annotations

import random

from .render import COLORS
from .world import HELD_OUT, KINDS, PLURAL, Scene, caption

DESCRIBE = "describe the image."  # the caption question (the demo asks it of easy-vqa's images too)
APART = 0.18  # how far apart (fraction of the canvas) two things must be for a relation question
CLEAR = 0.3  # training scenes ask about pairs this far apart first
YES_NO_RELATIONS = 3  # yes/no relation questions a scene (ordered pairs apart; the slowest skill to learn)
RELATIONS = {"left of": lambda a, b: b.x - a.x, "right of": lambda a, b: a.x - b.x,
             "above": lambda a, b: b.y - a.y, "below": lambda a, b: a.y - b.y}


def questions(scene: Scene, rng: random.Random, training: bool = False) -> list[tuple[str, str, str]]:
    """(question, answer, skill) for a scene: a few of each skill it can answer, and its caption; `training`: a
    training scene's mix (see above)."""
    if scene.word:
        return [("what word is written in the image?", scene.word, "reading"),
                (DESCRIBE, caption(scene), "caption")]
    out = count(scene, rng) + relation(scene, rng, training) + binding(scene, rng) + existence(scene, rng, training)
    return out + [(DESCRIBE, caption(scene), "caption")]


def count(scene: Scene, rng: random.Random) -> list[tuple[str, str, str]]:
    things = scene.things
    color, kind = rng.choice(COLORS), rng.choice(KINDS)
    asked = [("how many shapes are there?", len(things)),
             (f"how many {color} shapes are there?", sum(t.color == color for t in things)),
             (f"how many {PLURAL[kind]} are there?", sum(t.kind == kind for t in things))]
    return [(q, str(n), "count") for q, n in rng.sample(asked, 2)]


def relation(scene: Scene, rng: random.Random, training: bool = False) -> list[tuple[str, str, str]]:
    out = []
    pairs = [(a, b) for a in scene.things for b in scene.things if a is not b]
    rng.shuffle(pairs)
    asked = []  # each ordered pair with one relation: (a, b, word, gap)
    for a, b in pairs:
        word, gap = rng.choice(list(RELATIONS.items()))
        asked.append((a, b, word, gap(a, b)))
    if training:  # clear pairs first (a stable sort keeps the shuffled order within each group)
        asked.sort(key=lambda p: abs(p[3]) <= CLEAR)
    for a, b, word, gap in asked:
        if abs(gap) > APART:
            out.append((f"is the {a.name} {word} the {b.name}?", "yes" if gap > 0 else "no", "relation (yes/no)"))
            if len(out) == YES_NO_RELATIONS:
                break
    for b in rng.sample(list(scene.things), len(scene.things)):
        word, gap = rng.choice(list(RELATIONS.items()))
        ahead = [t for t in scene.things if t is not b and gap(t, b) > APART]
        near = [t for t in scene.things if t is not b and 0.04 < gap(t, b) <= APART]
        if len(ahead) == 1 and not near:
            out.append((f"what is {word} the {b.name}?", ahead[0].name, "relation (which)"))
            break
    return out


def binding(scene: Scene, rng: random.Random) -> list[tuple[str, str, str]]:
    things = scene.things
    if len(things) < 2:
        return []
    out = []
    kinds = [t for t in things if sum(u.kind == t.kind for u in things) == 1]
    colors = [t for t in things if sum(u.color == t.color for u in things) == 1]
    if kinds:
        thing = rng.choice(kinds)
        out.append((f"what color is the {thing.kind}?", thing.color, "binding"))
    if colors:
        thing = rng.choice(colors)
        out.append((f"what is the {thing.color} shape?", thing.kind, "binding"))
    return out


def existence(scene: Scene, rng: random.Random, training: bool = False) -> list[tuple[str, str, str]]:
    """One setting per scene (the one it can ask), as a yes and a no; a training scene never asks about a held-out
    pair (its answer would always be no: the model would learn the name, not look)."""
    present = {(t.color, t.kind) for t in scene.things}
    colors, kinds = {t.color for t in scene.things}, {t.kind for t in scene.things}
    unnamed = present | (set(HELD_OUT) if training else set())
    absent = [(c, k) for c in COLORS for k in KINDS if (c, k) not in unnamed]
    settings = {"random": [p for p in absent if p[0] not in colors and p[1] not in kinds],
                "popular": [p for p in absent if (p[0] in colors) != (p[1] in kinds)],
                "adversarial": [p for p in absent if p[0] in colors and p[1] in kinds]}
    usable = [name for name, options in settings.items() if options]
    if not usable or not present:
        return []
    name = rng.choice(usable)
    yes, no = rng.choice(sorted(present)), rng.choice(settings[name])
    skill = f"existence ({name})"
    return [(f"is there a {yes[0]} {yes[1]}?", "yes", skill), (f"is there a {no[0]} {no[1]}?", "no", skill)]

