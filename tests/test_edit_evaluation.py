"""Measuring edits (diffusion/evaluation/edits.py): the edit prompts, the weight contract on
hand-made responses, the word-swap cases, and swap scores on hand-drawn source and edit images."""

import copy
import dataclasses
import re

import numpy as np
import pytest

from diffusion.control.prompts import parse_prompt
from diffusion.data.shapes import (
    BACKGROUND,
    COLOURS,
    POSITION_PHRASES,
    POSITIONS,
    SIZES,
    Scene,
    ShapeObject,
    parse_holdout,
    render_scene,
)
from diffusion.evaluation.detector import detect
from diffusion.evaluation.edits import (
    CONTRACT_WEIGHTS,
    EDIT_WEIGHTS,
    MONOTONE_WEIGHTS,
    SWAP_KINDS,
    SWAP_MEASURES,
    SWAP_TARGETS,
    EditPrompt,
    SwapCase,
    edit_prompts,
    named_area,
    score_swap,
    swap_cases,
    swap_targets,
    weight_contract,
)

HOLDOUT = ["red square", "green triangle", "blue cross", "yellow circle", "orange circle"]
HELD = parse_holdout(HOLDOUT)
ARTICLES = ("a", "an")


def placed(colour, shape, size, position, resolution=32, offset=(0.0, 0.0)) -> ShapeObject:
    """An object at its position's anchor (moved by `offset` pixels)."""
    x, y = POSITIONS[position]
    center = (x * resolution + offset[0], y * resolution + offset[1])
    return ShapeObject(colour, shape, size, position, center, SIZES[size] * resolution)


def draw(*objects: ShapeObject, resolution: int = 32) -> np.ndarray:
    """(H, W, 3) uint8 image of `objects`."""
    return render_scene(Scene(list(objects), "", [], [], []), resolution)[0]


# ---- prompts of the weight response ----------------------------------------------------------


def test_edit_prompt_text_deleted_words_and_articles():
    orange = EditPrompt("orange", "circle", "left")
    assert orange.text() == "an orange circle on the left"
    assert orange.deleted("colour") == "a circle on the left"  # the article follows the next word
    assert orange.deleted("shape") == "an orange shape on the left"
    red = EditPrompt("red", "cross", "centre")
    assert red.text() == "a red cross in the centre"
    assert red.deleted("colour") == "a cross in the centre"


@pytest.mark.parametrize("word, weight", [("colour", 0.0), ("colour", 0.5), ("shape", 2.0), ("shape", 4.0)])
def test_weighted_edit_prompt_parses_to_the_plain_prompt_with_the_weight_on_the_word(word, weight):
    prompt = EditPrompt("orange", "triangle", "top")
    parsed = parse_prompt(prompt.text(word, weight))
    assert parsed.text == prompt.text() == "an orange triangle at the top"
    target = getattr(prompt, word)
    start = parsed.text.index(target)
    assert parsed.weight_at(start, start + len(target)) == weight
    other = prompt.shape if word == "colour" else prompt.colour
    start = parsed.text.index(other)
    assert parsed.weight_at(start, start + len(other)) == 1.0
    assert parsed.weight_at(0, 2) == 1.0  # the article is not weighted


def test_edit_prompts_are_deterministic_and_never_held_out():
    prompts = edit_prompts(200, 7, HOLDOUT)
    assert prompts == edit_prompts(200, 7, HOLDOUT)
    assert prompts != edit_prompts(200, 8, HOLDOUT)
    assert all((p.colour, p.shape) not in HELD for p in prompts)
    assert {p.position for p in prompts} == set(POSITION_PHRASES)
    assert len({(p.colour, p.shape) for p in prompts}) == len(COLOURS) * 4 - len(HELD)  # every other pair drawn


def test_named_area_counts_the_colour_or_the_shape():
    image, masks = render_scene(
        Scene([placed("red", "square", "large", "left"), placed("blue", "circle", "small", "right")], "", [], [], []),
        32,
    )
    found = detect(image)
    pixels = 32 * 32
    assert named_area(image, found, "colour", "red") == pytest.approx(masks[0].sum() / pixels)
    assert named_area(image, found, "colour", "blue") == pytest.approx(masks[1].sum() / pixels)
    assert named_area(image, found, "colour", "green") == 0.0
    assert named_area(image, found, "shape", "square") == pytest.approx(masks[0].sum() / pixels)
    assert named_area(image, found, "shape", "circle") == pytest.approx(masks[1].sum() / pixels)
    assert named_area(image, found, "shape", "cross") == 0.0
    assert named_area(image, [], "shape", "square") == 0.0  # shapes come from the detections


def test_named_when_drawn_counts_only_images_with_a_clean_object():
    from diffusion.evaluation.edits import _scores

    prompt = EditPrompt("red", "circle", "on the left")
    empty = np.full((32, 32, 3), BACKGROUND, np.uint8)
    images = [draw(RED), draw(placed("blue", "circle", "large", "left")), empty]  # named, not named, empty
    scores = _scores([prompt] * 3, "colour", images)
    assert scores["drawn"] == pytest.approx(2 / 3) and scores["present"] == pytest.approx(1 / 3)
    assert scores["named when drawn"] == 0.5
    assert _scores([prompt], "colour", [empty])["named when drawn"] is None  # nothing drawn: no share


# ---- the weight contract ---------------------------------------------------------------------


def good_response() -> dict:
    """A weight response that keeps every clause: drawn and present everywhere (weight 0: the
    attribute as often as with the word deleted), area and mass rising, even grain."""
    rows = [
        {
            "word": word,
            "mode": mode,
            "weight": w,
            "drawn": 1.0,
            "present": 0.2 if w == 0 else 1.0,
            "named when drawn": 0.2 if w == 0 else 1.0,
            "area": 0.01 * (1 + w),
            "mass": 0.1 * (1 + w),
            "grain": 2.0,
        }
        for word in ("colour", "shape")
        for mode in ("attention", "embedding")
        for w in EDIT_WEIGHTS
    ]
    deleted = {
        word: {"drawn": 1.0, "present": 0.2, "named when drawn": 0.2, "area": 0.01, "grain": 2.0}
        for word in ("colour", "shape")
    }
    return {"n": 20, "rows": rows, "deleted": deleted}


def row(response: dict, word: str, mode: str, weight: float) -> dict:
    (found,) = [r for r in response["rows"] if (r["word"], r["mode"], r["weight"]) == (word, mode, weight)]
    return found


def unmet(response: dict) -> set[str]:
    return {name for name, clause in weight_contract(response).items() if not clause["met"]}


def test_a_response_that_keeps_every_clause_meets_the_contract():
    contract = weight_contract(good_response())
    # per word and mode: weight 0 drawn, weight 0 near the prior, drawn and present at 0.5-2, grain, area, mass
    assert len(contract) == 2 * 2 * 7
    assert all(clause["met"] is True for clause in contract.values())
    assert all(name.startswith("edit/") for name in contract)


# (clause fragment, word, mode, change that keeps the clause, change that breaks it): each change
# sets rows[(weight, key)] or, for the prior, the word-deleted "present".
CLAUSES = [
    ("weight 0 draws an object", "colour", "attention", {(0.0, "drawn"): 0.95}, {(0.0, "drawn"): 0.94}),
    (
        "no more than deleting",
        "shape",
        "embedding",
        {(0.0, "named when drawn"): 0.25},
        {(0.0, "named when drawn"): 0.26},
    ),
    ("no more than deleting", "colour", "embedding", {"deleted": 0.15}, {"deleted": 0.14}),
    ("draw an object (least)", "shape", "attention", {(1.5, "drawn"): 0.95}, {(1.5, "drawn"): 0.94}),
    ("draw an object (least)", "colour", "embedding", {(0.5, "drawn"): 0.95}, {(0.5, "drawn"): 0.9}),
    ("keep the colour (least)", "colour", "attention", {(2.0, "present"): 0.95}, {(2.0, "present"): 0.94}),
    ("keep the shape (least)", "shape", "embedding", {(1.0, "present"): 0.95}, {(1.0, "present"): 0.5}),
    ("background grain", "colour", "embedding", {(2.0, "grain"): 3.0}, {(2.0, "grain"): 3.1}),
    ("background grain", "shape", "attention", {(1.0, "grain"): 4 / 3}, {(1.0, "grain"): 1.3}),
    # "rises" allows a step down of 5% of the value at weight 1 (area 0.02, mass 0.2 here)
    ("area rises", "shape", "attention", {(1.5, "area"): 0.019}, {(1.5, "area"): 0.0185}),
    ("area rises", "colour", "attention", {(0.0, "area"): 0.016}, {(0.0, "area"): 0.0165}),
    ("mass rises", "colour", "embedding", {(2.0, "mass"): 0.24}, {(2.0, "mass"): 0.235}),
]


@pytest.mark.parametrize("fragment, word, mode, keep, break_", CLAUSES)
def test_each_clause_flips_when_one_value_crosses_its_threshold(fragment, word, mode, keep, break_):
    def changed(changes):
        response = good_response()
        for where, value in changes.items():
            if where == "deleted":
                response["deleted"][word]["named when drawn"] = value
            else:
                row(response, word, mode, where[0])[where[1]] = value
        return response

    assert unmet(changed(keep)) == set()  # at the threshold: met
    failed = unmet(changed(break_))  # across it: this clause alone fails (the prior: in both modes)
    modes = ("attention", "embedding") if "deleted" in break_ else (mode,)
    assert len(failed) == len(modes)
    for name, failed_mode in zip(sorted(failed), modes):
        assert name.startswith(f"edit/{word} word, {failed_mode} mode: ") and fragment in name


@pytest.mark.parametrize("where", ["weight 0", "deleted"])
def test_weight_zero_naming_nothing_because_nothing_is_drawn_is_not_measured(where):
    """An empty image names no colour: the prior clause must not pass on images without objects."""
    response = good_response()
    emptied = row(response, "colour", "attention", 0.0) if where == "weight 0" else response["deleted"]["colour"]
    emptied.update({"drawn": 0.0, "present": 0.0, "named when drawn": None})
    contract = weight_contract(response)
    (prior,) = [c for n, c in contract.items() if n.startswith("edit/colour word, attention") and "deleting" in n]
    assert prior["met"] is None
    emptied.update({"drawn": 0.2, "named when drawn": 0.2})  # a few objects, as often named: still too few
    (prior,) = [
        c
        for n, c in weight_contract(response).items()
        if n.startswith("edit/colour word, attention") and "deleting" in n
    ]
    assert prior["met"] is None
    emptied["drawn"] = 0.25
    (prior,) = [
        c
        for n, c in weight_contract(response).items()
        if n.startswith("edit/colour word, attention") and "deleting" in n
    ]
    assert prior["met"] is True


def test_weight_four_is_reported_not_checked():
    response = good_response()
    for word in ("colour", "shape"):
        for mode in ("attention", "embedding"):
            row(response, word, mode, 4.0).update(drawn=0.0, present=0.0, area=0.0, mass=0.0, grain=100.0)
    assert unmet(response) == set()
    assert 4.0 not in CONTRACT_WEIGHTS + MONOTONE_WEIGHTS


def test_the_contract_checks_only_the_weights_measured():
    response = good_response()
    response["rows"] = [r for r in response["rows"] if r["weight"] in (1.0, 2.0)]
    names = set(weight_contract(response))
    assert not any("weight 0 " in name for name in names)  # no weight 0: no weight-0 clauses
    assert any("weights 1/2 draw an object" in name for name in names)
    row(response, "colour", "attention", 2.0)["mass"] = 0.1  # below weight 1
    assert unmet(response) == {"edit/colour word, attention mode: mass rises with the weight 0-2"}


# ---- word swap cases ---------------------------------------------------------------------------


def content(text: str) -> list[str]:
    """The words of a prompt without its articles."""
    return [w for w in re.findall(r"\w+", text) if w not in ARTICLES]


def articles_agree(text: str) -> bool:
    return all(
        (article == "an") == (following[0] in "aeiou") for article, following in re.findall(r"\b(an?) (\w+)", text)
    )


@pytest.mark.parametrize("kind", ["colour", "shape", "size"])
def test_a_swap_changes_exactly_the_swapped_word(kind):
    cases = swap_cases(kind, 40, 5, 32, HOLDOUT)
    assert len(cases) == 40 and cases == swap_cases(kind, 40, 5, 32, HOLDOUT)
    assert {len(c.scene.objects) for c in cases} == {1, 2}
    for case in cases:
        obj = case.scene.objects[case.index]
        assert case.kind == kind and case.source == case.scene.caption
        assert case.old == getattr(obj, kind) and case.new != case.old
        source, edit = content(case.source), content(case.edit)
        differ = [k for k, (a, b) in enumerate(zip(source, edit)) if a != b]
        assert len(source) == len(edit) and len(differ) == 1, case
        assert (source[differ[0]], edit[differ[0]]) == (case.old, case.new)
        assert articles_agree(case.edit), case.edit
        if kind == "size":
            assert case.scene.size_spans[case.index] is not None  # only sizes the caption names
            start = case.scene.size_spans[case.index][0]
            assert case.source[start : start + len(case.old)] == case.old
        else:
            swapped = (case.new, obj.shape) if kind == "colour" else (obj.colour, case.new)
            assert swapped not in HELD, case.edit


def test_colour_swaps_to_and_from_orange_move_the_article():
    """Orange is the one colour that takes "an": "a red circle" -> "an orange circle" and back."""
    to_orange = from_orange = 0
    for case in swap_cases("colour", 80, 5, 32, HOLDOUT):
        if case.scene.size_spans[case.index] is not None:
            continue  # "a small red circle": the article belongs to the size
        shape = case.scene.objects[case.index].shape
        if case.new == "orange":
            assert f"a {case.old} {shape}" in case.source and f"an orange {shape}" in case.edit
            to_orange += 1
        elif case.old == "orange":
            assert f"an orange {shape}" in case.source and f"a {case.new} {shape}" in case.edit
            from_orange += 1
    assert to_orange and from_orange


def test_an_added_word_is_the_colour_deleted_from_the_caption():
    cases = swap_cases("add", 40, 5, 32, HOLDOUT)
    assert cases == swap_cases("add", 40, 5, 32, HOLDOUT)
    for case in cases:
        obj = case.scene.objects[case.index]
        assert case.edit == case.scene.caption
        assert case.old is None and case.new == obj.colour
        start, end = case.scene.colour_spans[case.index]
        without = case.edit[:start] + case.edit[end + 1 :]  # the colour and its space
        assert content(case.source) == content(without)
        assert re.sub(r"\ban ", "a ", case.source) == re.sub(r"\ban ", "a ", without)  # only an article differs
        assert articles_agree(case.source), case.source
    assert any(c.new == "orange" for c in cases)  # "an orange circle" -> "a circle"


def test_swap_cases_never_draw_or_produce_a_held_out_pair():
    for kind in SWAP_KINDS:
        for case in swap_cases(kind, 40, 9, 32, HOLDOUT):
            assert not any((o.colour, o.shape) in HELD for o in case.scene.objects), case.source
            edited = [(o.colour, o.shape) for o in case.scene.objects]
            k = case.index
            if kind == "colour":
                edited[k] = (case.new, edited[k][1])
            elif kind == "shape":
                edited[k] = (edited[k][0], case.new)
            assert not set(edited) & HELD, case.edit


# ---- scoring a swap on hand-drawn images -------------------------------------------------------

RED = placed("red", "circle", "large", "left")
BLUE = placed("blue", "square", "small", "right")


def case_of(kind: str, old, new, objects=(RED, BLUE), index: int = 0) -> SwapCase:
    return SwapCase(kind, Scene(list(objects), "", [], [], []), "source", "edit", index, old, new)


def test_an_unchanged_edit_keeps_everything_and_adds_nothing():
    source = draw(RED, BLUE)
    scores = score_swap(case_of("colour", "red", "green"), source, source.copy())
    assert scores == {
        "new present": False,
        "old gone": False,
        "colour kept": True,
        "edited iou >= 0.8": True,
        "centre within 2 px": True,
        "others iou >= 0.9": True,
    }


def test_a_colour_swap_redrawn_in_the_new_colour():
    source = draw(RED, BLUE)
    edit = draw(dataclasses.replace(RED, colour="green"), BLUE)
    scores = score_swap(case_of("colour", "red", "green"), source, edit)
    assert scores == {
        "new present": True,
        "old gone": True,
        "colour kept": False,
        "edited iou >= 0.8": True,
        "centre within 2 px": True,
        "others iou >= 0.9": True,
    }
    purple = draw(dataclasses.replace(RED, colour="purple"), BLUE)  # changed, but not to the asked colour
    scores = score_swap(case_of("colour", "red", "green"), source, purple)
    assert scores["old gone"] and not scores["new present"]


def test_another_object_moved_by_a_few_pixels_fails_others_iou():
    source = draw(RED, BLUE)
    moved = dataclasses.replace(BLUE, center=(BLUE.center[0] + 3, BLUE.center[1]))
    green = dataclasses.replace(RED, colour="green")
    scores = score_swap(case_of("colour", "red", "green"), source, draw(green, moved))
    assert scores["others iou >= 0.9"] is False
    assert scores["new present"] and scores["edited iou >= 0.8"]  # the edited object itself is fine
    gone = score_swap(case_of("colour", "red", "green"), source, draw(green))
    assert gone["others iou >= 0.9"] is False  # the other object vanished


def test_a_shape_swap_at_the_same_centre_keeps_its_place():
    source = draw(RED, BLUE)
    case = case_of("shape", "circle", "triangle")
    scores = score_swap(case, source, draw(dataclasses.replace(RED, shape="triangle"), BLUE))
    assert scores["new present"] and scores["old gone"] and scores["colour kept"]
    assert scores["centre within 2 px"] and scores["others iou >= 0.9"]
    shifted = dataclasses.replace(RED, shape="triangle", center=(RED.center[0], RED.center[1] + 3))
    scores = score_swap(case, source, draw(shifted, BLUE))
    assert scores["new present"] and not scores["centre within 2 px"]


def test_a_source_that_does_not_draw_its_objects_is_not_scored():
    case = case_of("colour", "red", "green")
    blank = np.full((32, 32, 3), BACKGROUND, np.uint8)
    assert score_swap(case, blank, draw(RED, BLUE)) is None
    assert score_swap(case, draw(RED), draw(RED, BLUE)) is None  # one object missing
    wrong = draw(dataclasses.replace(RED, colour="yellow"), BLUE)  # the edited object in another colour
    assert score_swap(case, wrong, wrong) is None


def test_an_added_colour_matches_the_uncoloured_source_object_by_shape():
    case = case_of("add", None, "red", objects=(RED,))
    any_colour = draw(dataclasses.replace(RED, colour="blue"))  # the prompt named no colour: any will do
    scores = score_swap(case, any_colour, draw(RED))
    assert scores["new present"] and scores["old gone"] and not scores["colour kept"]
    assert scores["edited iou >= 0.8"]
    assert score_swap(case, any_colour, any_colour)["new present"] is False
    assert score_swap(case, draw(dataclasses.replace(RED, shape="square")), draw(RED)) is None  # wrong shape


def test_swap_cases_of_the_generator_score_as_kept_when_nothing_changes():
    """End to end on generated cases: each source drawn by the generator is scored, and an
    edit identical to it keeps the layout and shows the new attribute only if the source had it."""
    for kind in SWAP_KINDS:
        for case in swap_cases(kind, 6, 3, 32, HOLDOUT):
            source = render_scene(case.scene, 32)[0]
            scores = score_swap(case, source, source)
            assert scores is not None, case.source
            assert scores["edited iou >= 0.8"] and scores["others iou >= 0.9"]
            # an added colour is the one the generator drew; a swapped attribute is still the old one
            assert scores["new present"] == (kind == "add"), case.source


# ---- swap targets --------------------------------------------------------------------------------


def swap_response() -> dict:
    """Every swap rate 1 at edit steps 0.2 and 0.6."""
    rates = dict.fromkeys(SWAP_MEASURES, 1.0)
    return {
        "kinds": {
            kind: {"n": 10, "by_steps": {"0.6": {"scored": 10, **rates}, "0.2": {"scored": 10, **rates}}}
            for kind in SWAP_KINDS
        }
    }


def test_swap_targets_check_colour_and_shape_swaps_at_one_edit_steps_value():
    response = swap_response()
    result = swap_targets(response, 0.6)
    expected = {f"swap/{kind} swap at edit steps 0.6: {m}" for kind, ms in SWAP_TARGETS.items() for m in ms}
    assert set(result) == expected and all(t["met"] is True for t in result.values())
    assert not any("size" in name or "add" in name for name in result)  # reported, not targeted
    assert swap_targets(response, 0.4) == {}  # not measured at that value
    for kind, measures in SWAP_TARGETS.items():
        for measure, target in measures.items():
            changed = copy.deepcopy(response)
            changed["kinds"][kind]["by_steps"]["0.6"][measure] = target
            assert all(t["met"] for t in swap_targets(changed, 0.6).values())  # a rate at its goal meets it
            changed["kinds"][kind]["by_steps"]["0.6"][measure] = target - 0.01
            failed = [name for name, t in swap_targets(changed, 0.6).items() if not t["met"]]
            assert failed == [f"swap/{kind} swap at edit steps 0.6: {measure}"]
            assert all(t["met"] for t in swap_targets(changed, 0.2).values())  # the other value untouched


def test_swap_targets_with_no_scored_pair_are_not_measured():
    response = swap_response()
    for rates in response["kinds"]["colour"]["by_steps"].values():
        rates.update({m: None for m in SWAP_TARGETS["colour"]}, scored=0)
    result = swap_targets(response, 0.6)
    assert all(t["met"] is None for name, t in result.items() if name.startswith("swap/colour"))
    assert all(t["met"] is True for name, t in result.items() if name.startswith("swap/shape"))
