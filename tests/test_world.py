"""The drawn data: the renderer's colour names stay true, easy-vqa's questions on drawn shapes are right, the world
generator is deterministic and its answers hold on hand-checked scenes, held-out pairs stay out of training, and the
blind and shuffled baselines really take the image away."""

import colorsys
import hashlib
import json
import random

import pyarrow.parquet as pq
import pytest
from PIL import Image

from minimind_v.data.easy_shapes import color_pair, make_split, questions, render_single, render_single_mpl
from minimind_v.data.render import COLOR_BOXES, COLORS, PURE, Style, enlarge, sample_color, shrink
from minimind_v.data.world import (HELD_OUT, Scene, Thing, caption, caption_objects, names_held_out, sample_scene,
                                   world_rows, write_world)
from minimind_v.data.world_questions import questions as world_questions
from minimind_v.evaluate import QAItem, baseline_items, caption_scores


def name_of(rgb) -> set[str]:
    """Every colour name whose HSV box holds `rgb`."""
    h, s, v = colorsys.rgb_to_hsv(*(c / 255 for c in rgb))
    hue = h * 360
    found = set()
    for name, (hues, sats, vals) in COLOR_BOXES.items():
        in_hue = hues is None or any(hues[0] - 1 <= x <= hues[1] + 1 for x in (hue, hue - 360))
        if in_hue and sats[0] - 0.01 <= s <= sats[1] + 0.01 and vals[0] - 0.01 <= v <= vals[1] + 0.01:
            found.add(name)
    return found


def test_sampled_colours_keep_their_name_and_the_boxes_do_not_overlap():
    rng = random.Random(0)
    for name in COLORS:
        for _ in range(200):
            assert name_of(sample_color(name, rng, pure=False)) == {name}
        assert sample_color(name, rng, pure=True) == PURE[name]
    assert name_of((0, 128, 0)) == {"green"} and name_of((0, 255, 0)) == {"green"}  # PIL's and easy-vqa's green


def yes_no_answer(q: str, color: str, shape: str) -> str:
    """The truth of one of easy-vqa's yes/no questions about a one-shape image, read off the question's words."""
    thing = (q.split(" a ", 1)[1] if " a " in q else q.removeprefix("is no ")).split("?")[0]
    thing = thing.replace(" in the image", "").replace(" present", "")
    present = thing in (shape, f"{color} shape")
    negated = " not " in q or q.startswith("is no ")
    return "yes" if present != negated else "no"


def test_easy_vqa_questions_on_drawn_shapes_are_right():
    rng = random.Random(1)
    for _ in range(50):
        color, shape = rng.choice(COLORS), rng.choice(("circle", "rectangle", "triangle"))
        for q, a, kind in questions(color, shape, rng, count=30):
            if kind == "color":
                assert a == color
            elif kind == "shape":
                assert a == shape
            else:
                assert a == yes_no_answer(q, color, shape), (q, a, color, shape)
        (q1, a1), (q2, a2) = color_pair(color, rng)  # the same template, the shape's colour and another one
        other = next(c for c in COLORS if f"{c} shape" in q2)
        assert {a1, a2} == {"yes", "no"} and q1.replace(color, "X") == q2.replace(other, "X") and other != color
        assert a1 == yes_no_answer(q1, color, shape) and a2 == yes_no_answer(q2, color, shape), (q1, q2, color)
        assert f"{color} shape" in q1 and f"{color} shape" not in q2


def test_renders_are_seeded_and_within_their_style():
    shifted = lambda rng: render_single(Style.shifted(), rng)  # noqa: E731
    first, again = make_split(20, 3, shifted), make_split(20, 3, shifted)
    assert [(q, a, t, im.tobytes()) for q, a, t, im in first] == [(q, a, t, im.tobytes()) for q, a, t, im in again]
    rng = random.Random(4)
    for _ in range(30):
        image, color, shape = render_single(Style.shifted(), rng)
        assert 32 <= min(image.size) <= 512 and max(image.size) <= 2 * min(image.size) + 1
        image, color, shape = render_single_mpl(rng)
        assert image.mode == "RGB" and 32 <= min(image.size)


def test_supersampling_antialiases_edges_and_leaves_flat_areas_as_they_were():
    """A drawing on an enlarged canvas, shrunk back: the background's pixels exactly as before, a diagonal edge's
    pixels between the two colours (what antialiasing is), the size as it was."""
    from PIL import ImageDraw

    base = Image.effect_noise((37, 23), 40).convert("RGB")  # any background, odd sizes
    assert shrink(enlarge(base, 4), 4).tobytes() == base.tobytes()
    big = enlarge(Image.new("RGB", (32, 32), (255, 255, 255)), 4)
    ImageDraw.Draw(big).polygon([(0, 0), (128, 0), (0, 128)], fill=(0, 0, 0))
    small = shrink(big, 4)
    values = {small.getpixel((x, 31 - x))[0] for x in range(32)}  # along the diagonal: neither colour
    assert small.size == (32, 32) and all(0 < v < 255 for v in values)
    assert small.getpixel((2, 2)) == (0, 0, 0) and small.getpixel((29, 29)) == (255, 255, 255)


def scene() -> Scene:
    return Scene((Thing("circle", "red", 0.15, 0.5, 0.08), Thing("star", "blue", 0.85, 0.5, 0.08),
                  Thing("triangle", "red", 0.5, 0.15, 0.08)))


def test_world_answers_on_a_hand_checked_scene():
    asked = {}
    for seed in range(200):
        for q, a, skill in world_questions(scene(), random.Random(seed)):
            asked[q] = (a, skill)
    expected = {"how many shapes are there?": "3", "how many red shapes are there?": "2",
                "how many blue shapes are there?": "1", "how many green shapes are there?": "0",
                "how many stars are there?": "1", "how many hearts are there?": "0",
                "is the red circle left of the blue star?": "yes", "is the blue star left of the red circle?": "no",
                "is the red triangle above the red circle?": "yes", "what is left of the blue star?": None,
                "what color is the star?": "blue", "what color is the circle?": "red",
                "what is the blue shape?": "star", "is there a blue star?": "yes", "is there a blue circle?": "no",
                "describe the image.": "a red circle, a red triangle and a blue star."}
    for q, a in expected.items():
        if a is None:
            assert q not in asked  # two things are left of the star: no single answer, never asked
        elif q in asked:
            assert asked[q][0] == a, q
    assert {"count", "relation (yes/no)", "relation (which)", "binding", "caption"} <= {s for _, s in asked.values()}
    assert asked["is there a blue circle?"][1] == "existence (adversarial)"  # blue and circle both present
    assert caption(scene()) == "a red circle, a red triangle and a blue star."


def test_a_scene_asks_several_yes_no_relations_each_right():
    """Up to YES_NO_RELATIONS yes/no relation questions a scene, on different ordered pairs, every answer read off
    the positions by hand: the red circle is left of and below the blue star, the green heart is right of it."""
    from minimind_v.data.world_questions import YES_NO_RELATIONS, relation

    spread = Scene((Thing("circle", "red", 0.15, 0.8, 0.08), Thing("star", "blue", 0.5, 0.2, 0.08),
                    Thing("heart", "green", 0.85, 0.8, 0.08)))
    truth = {("red circle", "blue star"): {"left of": "yes", "right of": "no", "above": "no", "below": "yes"},
             ("green heart", "blue star"): {"left of": "no", "right of": "yes", "above": "no", "below": "yes"},
             ("red circle", "green heart"): {"left of": "yes", "right of": "no"}}  # same height: never above/below
    for a, b in list(truth):
        truth[b, a] = {w: ("no" if a_ == "yes" else "yes") for w, a_ in truth[a, b].items()}
    sizes = set()
    for seed in range(50):
        asked = [(q, a) for q, a, skill in relation(spread, random.Random(seed)) if skill == "relation (yes/no)"]
        assert len({q for q, _ in asked}) == len(asked)
        sizes.add(len(asked))
        for q, a in asked:
            first, word, second = next((x, w, y) for (x, y), words in truth.items() for w in words
                                       if q == f"is the {x} {w} the {y}?")
            assert truth[first, second][word] == a, q
    assert max(sizes) == YES_NO_RELATIONS == 3 and min(sizes) >= 1


def test_training_scenes_ask_clear_relations_first():
    """A training scene's yes/no relations take pairs over CLEAR apart first; the test scenes' take any pair over
    APART. Every answer is right either way."""
    from minimind_v.data.world_questions import APART, CLEAR, RELATIONS, relation

    things = (Thing("circle", "red", 0.1, 0.1, 0.05), Thing("star", "red", 0.22, 0.9, 0.05),  # 0.12 / 0.8 apart
              Thing("heart", "blue", 0.5, 0.5, 0.05), Thing("arrow", "blue", 0.75, 0.3, 0.05))
    by_name = {t.name: t for t in things}
    gaps = {}
    for training in (False, True):
        gaps[training] = []
        for seed in range(300):
            for q, a, skill in relation(Scene(things), random.Random(seed), training):
                if skill == "relation (yes/no)":
                    first, word, second = next((x, w, y) for x in by_name for w in RELATIONS for y in by_name
                                               if q == f"is the {x} {w} the {y}?")
                    gap = RELATIONS[word](by_name[first], by_name[second])
                    assert a == ("yes" if gap > 0 else "no") and abs(gap) > APART, q
                    gaps[training].append(abs(gap))
    share = {t: sum(g > CLEAR for g in gaps[t]) / len(gaps[t]) for t in gaps}
    assert share[True] > share[False] + 0.15, share


def test_the_world_is_deterministic_and_holds_pairs_out_of_training(tmp_path):
    counts = write_world(str(tmp_path / "a"), 60, 40, seed=5)
    write_world(str(tmp_path / "b"), 60, 40, seed=5)
    digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
    assert digest(tmp_path / "a" / "test.jsonl") == digest(tmp_path / "b" / "test.jsonl")
    train = pq.read_table(tmp_path / "a" / "train.parquet").to_pydict()
    assert train == pq.read_table(tmp_path / "b" / "train.parquet").to_pydict()
    assert {k.split(" ", 1)[1] for k in counts} >= {"count", "binding", "caption", "reading"}
    held = {f"{c} {k}" for c, k in HELD_OUT}
    captions = [json.loads(c)[1]["content"] for c, s in zip(train["conversations"], train["skill"]) if s == "caption"]
    assert not any(h in c for c in captions for h in held)
    questions = [json.loads(c)[0]["content"] for c in train["conversations"]]  # nor is one asked about, even as a no
    assert not any(names_held_out(q) for q in questions) and all(names_held_out(f"is there a {h}?") for h in held)
    tests = [json.loads(line) for line in open(tmp_path / "a" / "test.jsonl")]
    assert any(h in t["answer"] for t in tests if t["type"] == "caption" for h in held)
    assert all((tmp_path / "a" / t["image"]).is_file() for t in tests)
    assert [r[2:] for r in world_rows(10, 5, seed=5) if r[0] == "test"] == \
        [r[2:] for r in world_rows(30, 5, seed=5) if r[0] == "test"]  # the test set whatever the training size
    rng = random.Random(0)
    assert all(len({(t.color, t.kind) for t in s.things}) == len(s.things)
               for s in (sample_scene(rng, "train") for _ in range(200)))


def test_drawing_on_several_processes_gives_the_same_rows():
    """Each training scene comes from its own seed: the rows do not depend on how many processes drew them, a
    scene drawn alone is the same scene, and the test scenes do not depend on the training size."""
    from minimind_v.data.world import training_scene

    alone = world_rows(12, 4, seed=3, workers=1)
    assert world_rows(12, 4, seed=3, workers=3) == alone
    assert [r for r in alone if r[0] == "train" and r[1] == 7] == training_scene(3, 0.3, 7)
    assert len({r[5] for r in alone if r[0] == "train"}) == 12  # twelve different images
    assert [r for r in world_rows(5, 4, seed=3) if r[0] == "test"] == [r for r in alone if r[0] == "test"]


def test_training_renders_are_the_same_on_any_number_of_processes():
    """The demo's renders: the random draws in one stream, the painting on several processes; the rows are those of
    drawing each image with `render_single` from that stream, one after another."""
    from minimind_v.data.easy_shapes import STORED_SIDE, rendered_rows
    from minimind_v.data.render import encode_png

    rows = rendered_rows(9, seed=5, workers=1)
    assert rendered_rows(9, seed=5, workers=3) == rows
    rng = random.Random(5)
    for number in range(9):
        image, color, shape = render_single(Style.train(), rng)
        image.thumbnail((STORED_SIDE, STORED_SIDE), Image.Resampling.LANCZOS)
        pair, asked = color_pair(color, rng), questions(color, shape, rng, 2)
        assert rows[6 * number:6 * number + 6] == [
            (q, a, encode_png(image)) for q, a in [(f"what color is the {shape}?", color),
                                                   ("what shape is in the image?", shape), *pair,
                                                   *[(q, a) for q, a, _ in asked]]]


def test_baselines_take_the_image_away():
    images = [Image.new("RGB", (8, 8), (i * 40, 0, 0)) for i in range(4)]
    items = [QAItem("<image>\nq", "a", [images[i // 2]], qtype="t") for i in range(8)]  # two questions an image
    blind = baseline_items(items, "blind")
    assert all(im.getpixel((0, 0)) == (128, 128, 128) for item in blind for im in item.images)
    shuffled = baseline_items(items, "shuffled", seed=1)
    assert all(s.images[0] is not i.images[0] for s, i in zip(shuffled, items))
    assert sorted(id(s.images[0]) for s in shuffled) == sorted(id(i.images[0]) for i in items)
    with pytest.raises(ValueError, match="unknown baseline"):
        baseline_items(items, "upside-down")


def test_captions_are_scored_by_the_objects_they_name():
    truth = "a red circle, a blue star and a green triangle."
    assert caption_objects("a green triangle, a red circle and a blue star.") == caption_objects(truth)
    assert caption_objects("a red circle and a blue star.") != caption_objects(truth)  # one missing
    assert caption_objects("a red circle, a blue heart and a green triangle.") != caption_objects(truth)  # wrong kind
    assert caption_objects('the word "cat" written in red.') == ("word", "cat")
    scores = caption_scores([truth, truth, 'the word "cat" written in red.'],
                            ["a green triangle, a red circle and a blue star.", "a red circle.", None])
    assert (scores["correct"], scores["total"]) == (1, 2)  # None: a question the model could not take
    if scores["bleu"] is not None:
        assert 0 < scores["bleu"] < 100


def test_the_reading_share_is_a_knob_of_the_world_command(tmp_path, capsys):
    from minimind_v.cli import main
    from minimind_v.data.world import world_rows

    def reading_scenes(share):
        return len({(r[0], r[1]) for r in world_rows(200, 0, seed=3, reading=share) if r[4] == "reading"})

    assert reading_scenes(0.0) == 0 and reading_scenes(1.0) == 200 and 40 < reading_scenes(0.3) < 80
    assert main(["world", str(tmp_path / "w"), "--train-scenes", "20", "--test-scenes", "5", "--reading", "1"]) == 0
    skills = set(pq.read_table(tmp_path / "w" / "train.parquet").column("skill").to_pylist())
    assert skills == {"reading", "caption"}
    assert main(["world", str(tmp_path / "x"), "--reading", "1.5"]) != 0
    assert "reading scenes must be in [0, 1]" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
