"""Tests for diffusion/control/prompts.py: weighting syntax, words, token/word maps and token alignment."""

import pytest
import torch
from transformers import CLIPTextModel

from diffusion.control.prompts import (
    PromptSyntaxError,
    WeightedPrompt,
    align_tokens,
    delete_tokens,
    find_word,
    format_prompt,
    parse_prompt,
    set_word_weight,
    split_words,
    token_word_index,
    word_token_weights,
    word_tokens,
)
from diffusion.errors import UserError, exit_on_user_error
from diffusion.model.text_encoder import TextEncoder
from diffusion.training.clip import clip_text_config, fit_tokenizer

CAPTIONS = [
    f"a {colour} {shape} on the {side}"
    for colour in ("red", "green", "blue", "yellow")
    for shape in ("circle", "square", "triangle")
    for side in ("left", "right")
]
T = 16


@pytest.fixture(scope="module")
def tokenizer():
    return fit_tokenizer(CAPTIONS * 4, vocab_size=600, model_max_length=T)


def offsets_of(tokenizer, prompt):
    """(T, 2) offsets of one prompt, padded (and truncated) to T tokens, as TextEncoder.tokenize gives."""
    tokens = tokenizer(
        prompt, return_offsets_mapping=True, padding="max_length", truncation=True, max_length=T, return_tensors="pt"
    )
    return tokens["offset_mapping"][0]


# --- the weighting syntax ---------------------------------------------------------------------

GOOD = [
    # (written, plain text, [(weighted substring, start, weight), ...])
    ("a red circle", "a red circle", []),
    ("", "", []),
    ("a (red:1.5) circle", "a red circle", [("red", 2, 1.5)]),
    ("(several words:0.5) here", "several words here", [("several words", 0, 0.5)]),
    ("(red:1)", "red", [("red", 0, 1.0)]),
    ("(red:.5)", "red", [("red", 0, 0.5)]),
    ("(red:2.)", "red", [("red", 0, 2.0)]),
    ("(red:0) circle", "red circle", [("red", 0, 0.0)]),
    ("(red:0.0)", "red", [("red", 0, 0.0)]),
    ("(red: 1.25 )", "red", [("red", 0, 1.25)]),
    ("a ( red :2) b", "a  red  b", [("red", 3, 2.0)]),
    ("(a:2)(b:3)", "ab", [("a", 0, 2.0), ("b", 1, 3.0)]),
    ("(a red:2) circle (on the left:0.25)", "a red circle on the left", [("a red", 0, 2.0), ("on the left", 13, 0.25)]),
    (r"a \(red\) circle", "a (red) circle", []),
    (r"(\(red\):2)", "(red)", [("(red)", 0, 2.0)]),
    (r"back\\slash", "back\\slash", []),
    ("ratio 1:2", "ratio 1:2", []),
    (r"(ratio 1\:2:3)", "ratio 1:2", [("ratio 1:2", 0, 3.0)]),
    ("(red:10)dish", "reddish", [("red", 0, 10.0)]),
    ("(red, blue:0.5)!", "red, blue!", [("red, blue", 0, 0.5)]),
    ("(héllo 日本:1.5)", "héllo 日本", [("héllo 日本", 0, 1.5)]),
]


@pytest.mark.parametrize("written, text, spans", GOOD, ids=[case[0] or "<empty>" for case in GOOD])
def test_parse_good(written, text, spans):
    parsed = parse_prompt(written)
    assert parsed.text == text
    assert parsed.weights == tuple((start, start + len(sub), weight) for sub, start, weight in spans)
    for sub, start, weight in spans:
        assert parsed.text[start : start + len(sub)] == sub
        assert parsed.weight_at(start, start + len(sub)) == weight
    if not spans:
        assert parsed.weight_at(0, len(text)) == 1.0


# AUTOMATIC1111's factors (its round_bracket_multiplier and square_bracket_multiplier): every
# expected weight below is written as A1111's multiply_range computes it, starting from 1.0 and
# multiplying by each group's factor in the order the groups close, innermost first.
R, S = 1.1, 1 / 1.1

A1111 = [
    # (written, plain text, [(weighted substring, start, weight), ...]): the weights AUTOMATIC1111 would give
    ("(red)", "red", [("red", 0, 1.0 * R)]),
    ("((red))", "red", [("red", 0, 1.0 * R * R)]),
    ("(((red)))", "red", [("red", 0, 1.0 * R * R * R)]),
    ("[red]", "red", [("red", 0, 1.0 * S)]),
    ("[[red]]", "red", [("red", 0, 1.0 * S * S)]),
    ("(red:1.3)", "red", [("red", 0, 1.0 * 1.3)]),  # the weight replaces the group's 1.1
    ("((red:1.5))", "red", [("red", 0, 1.0 * 1.5 * R)]),
    ("((red:1.5) circle)", "red circle", [("red", 0, 1.0 * 1.5 * R), ("circle", 4, 1.0 * R)]),
    ("[(red:2)]", "red", [("red", 0, 1.0 * 2 * S)]),
    ("([red])", "red", [("red", 0, 1.0 * S * R)]),  # listed although it comes to (about) 1
    ("a (red) [blue] circle", "a red blue circle", [("red", 2, 1.0 * R), ("blue", 6, 1.0 * S)]),
    (r"\(red\)", "(red)", []),
    (r"\[red\]", "[red]", []),
    (r"(a \[b\]:2)", "a [b]", [("a [b]", 0, 1.0 * 2)]),
    (r"(ratio 1\:2)", "ratio 1:2", [("ratio 1:2", 0, 1.0 * R)]),
    ("((red)) ratio 1:2", "red ratio 1:2", [("red", 0, 1.0 * R * R)]),
    ("(red circle) on the left", "red circle on the left", [("red circle", 0, 1.0 * R)]),
    ("[far left, top]", "far left, top", [("far left, top", 0, 1.0 * S)]),
    ("( red ) x", " red  x", [("red", 1, 1.0 * R)]),  # whitespace at the edges is not weighted
    ("((red) )", "red ", [("red", 0, 1.0 * R * R)]),
    ("(a (b) c)", "a b c", [("a", 0, 1.0 * R), ("b", 2, 1.0 * R * R), ("c", 4, 1.0 * R)]),
    ("(a (red:2) b:2)", "a red b", [("a", 0, 1.0 * 2), ("red", 2, 1.0 * 2 * 2), ("b", 6, 1.0 * 2)]),
    ("[a (b:0) c]", "a b c", [("a", 0, 1.0 * S), ("b", 2, 1.0 * 0 * S), ("c", 4, 1.0 * S)]),
    ("(a [b] (c:2):0.5)", "a b c", [("a", 0, 1.0 * 0.5), ("b", 2, 1.0 * S * 0.5), ("c", 4, 1.0 * 2 * 0.5)]),
    ("(red) (red)", "red red", [("red", 0, 1.0 * R), ("red", 4, 1.0 * R)]),
    ("(red)(blue)", "redblue", [("redblue", 0, 1.0 * R)]),  # one run of one weight: one span
    ("(red)dish [x]", "reddish x", [("red", 0, 1.0 * R), ("x", 8, 1.0 * S)]),
]


@pytest.mark.parametrize("written, text, spans", A1111, ids=[case[0] for case in A1111])
def test_parse_gives_the_weights_automatic1111_would_give(written, text, spans):
    parsed = parse_prompt(written)
    assert parsed.text == text
    assert [(start, end) for start, end, _ in parsed.weights] == [(start, start + len(sub)) for sub, start, _ in spans]
    assert [weight for _, _, weight in parsed.weights] == pytest.approx([weight for _, _, weight in spans])
    for sub, start, weight in spans:
        assert parsed.text[start : start + len(sub)] == sub
        assert parsed.weight_at(start, start + len(sub)) == pytest.approx(weight)


BAD = [
    # (written, reason (a prefix), 1-based column)
    ("a red) circle", "unbalanced ')'", 6),
    (")", "unbalanced ')'", 1),
    ("a red] circle", "unbalanced ']'", 6),
    ("(red))", "unbalanced ')'", 6),
    ("]", "unbalanced ']'", 1),
    ("a (red circle", "'(' is never closed", 3),
    ("a (red:1.5 circle", "'(' is never closed", 3),
    ("a [red circle", "'[' is never closed", 3),
    ("((red)", "'(' is never closed", 1),
    ("(a [b", "'[' is never closed", 4),  # the innermost one left open
    ("[(red:1.5]", "'(' is never closed", 2),
    ("(red]", "mismatched ']' (the '(' at column 1 needs ')')", 5),
    ("[red)", "mismatched ')' (the '[' at column 1 needs ']')", 5),
    ("a ([red)]", "mismatched ')' (the '[' at column 4 needs ']')", 8),
    ("(red:abc)", "bad weight 'abc' (expected a number like 1.5)", 6),
    ("(red:  abc )", "bad weight 'abc'", 8),
    ("(red:1e3)", "bad weight '1e3'", 6),
    ("(red:+1)", "bad weight '+1'", 6),
    ("(red:1.5.2)", "bad weight '1.5.2'", 6),
    ("(red:.)", "bad weight '.'", 6),
    ("(red:1:2)", "bad weight '1:2'", 6),
    ("(ratio 1:2 thing:1.5)", "bad weight '2 thing:1.5'", 10),
    ("(red:1.5 (blue:2)", "bad weight '1.5 (blue:2'", 6),
    ("((red:1.5 circle)", "bad weight '1.5 circle'", 7),
    ("(red:-1)", "negative weight '-1'", 6),
    ("(red:)", "missing weight after ':'", 6),
    ("(red:   )", "missing weight after ':'", 9),
    ("()", "nothing to weight in '()'", 1),
    ("[]", "nothing to weight in '[]'", 1),
    ("a (   ) b", "nothing to weight in '()'", 3),
    ("a [ ] b", "nothing to weight in '[]'", 3),
    ("(())", "nothing to weight in '()'", 2),
    ("(red [])", "nothing to weight in '[]'", 6),
    ("(:1.5)", "nothing to weight before ':'", 1),
    ("x (  :1.5)", "nothing to weight before ':'", 3),
    ("([]:2)", "nothing to weight in '[]'", 2),
    ("[red:1.5]", "':' inside '[...]' (a weight needs round brackets", 5),
    ("[a:b:5]", "':' inside '[...]'", 3),
    ("([red:2])", "':' inside '[...]'", 6),
    ("[(a) b:2]", "':' inside '[...]'", 7),
    ("red\\", "dangling '\\' at the end", 4),
    ("(red\\", "dangling '\\' at the end", 5),
    ("a \\n b", "unknown escape '\\n' (only \\( \\) \\[ \\] \\: \\\\ are escapes)", 3),
    ("\\{red}", "unknown escape '\\{'", 1),
]


@pytest.mark.parametrize("written, reason, column", BAD, ids=[case[0] for case in BAD])
def test_parse_malformed(written, reason, column):
    with pytest.raises(PromptSyntaxError) as caught:
        parse_prompt(written)
    error = caught.value
    assert isinstance(error, UserError)
    assert error.reason.startswith(reason)
    assert error.column == column
    first, prompt_line, caret_line = str(error).split("\n")
    assert first == f"malformed prompt: {error.reason} at column {column}"
    assert prompt_line == "  " + written
    assert caret_line == " " * (column + 1) + "^"
    assert written[caret_line.index("^") - 2] == written[column - 1]


def test_caret_stays_under_the_column_with_tabs_newlines_and_wide_characters():
    with pytest.raises(PromptSyntaxError) as caught:
        parse_prompt("a\tb\n日本 x)")
    _, prompt_line, caret_line = str(caught.value).split("\n")
    assert caught.value.column == 9
    assert prompt_line == "  a b 日本 x)"  # whitespace shown as spaces: still three lines
    assert caret_line == "  " + " " * 10 + "^"  # 日本 take two columns each


def test_cli_prints_the_error_line_then_the_prompt_and_caret(capsys):
    @exit_on_user_error
    def main():
        parse_prompt("a (red:abc)")

    with pytest.raises(SystemExit) as exited:
        main()
    assert exited.value.code == 2
    assert capsys.readouterr().err == (
        "error: malformed prompt: bad weight 'abc' (expected a number like 1.5) at column 8\n"
        "  a (red:abc)\n"
        "         ^\n"
    )


def test_parse_rejects_non_text():
    with pytest.raises(UserError, match="must be text"):
        parse_prompt(None)


def test_weight_at_takes_the_most_overlapping_span():
    prompt = WeightedPrompt("abcdefgh", ((0, 2, 2.0), (2, 6, 0.5)))
    assert prompt.weight_at(6, 8) == 1.0
    assert prompt.weight_at(0, 1) == 2.0
    assert prompt.weight_at(1, 4) == 0.5  # 2 characters at 0.5 against 1 at 2.0
    assert prompt.weight_at(1, 3) == 2.0  # a tie: the first span
    assert parse_prompt("(red:3)dish").weight_at(0, 7) == 3.0  # a partly bracketed word


# --- words --------------------------------------------------------------------------------------


def test_split_words_labels_repeats_case_insensitively():
    words = split_words("A red circle, a RED square; don't red!")
    assert [word.text for word in words] == ["A", "red", "circle", "a", "RED", "square", "don't", "red"]
    assert [word.label for word in words] == ["A", "red", "circle", "a#2", "RED#2", "square", "don't", "red#3"]
    assert [word.occurrence for word in words] == [1, 1, 1, 2, 2, 1, 1, 3]
    assert all(word.text == "A red circle, a RED square; don't red!"[word.start : word.end] for word in words)
    assert split_words(" ,.! ") == []


def test_find_word():
    words = split_words("a red circle and a Red square")
    assert find_word(words, "red") == 1
    assert find_word(words, "red#1") == 1
    assert find_word(words, "RED#2") == 5
    assert find_word(words, "a#2") == 4
    with pytest.raises(UserError, match=r"no word 'red#3'.*a, red, circle, and, a#2, Red#2, square") as caught:
        find_word(words, "red#3")
    assert "\n" not in str(caught.value)
    with pytest.raises(UserError, match="did you mean 'circle'"):
        find_word(words, "circel")
    with pytest.raises(UserError, match="no words"):
        find_word([], "red")


# --- writing prompts: format_prompt and set_word_weight -----------------------------------------


def test_format_prompt_writes_the_spans_not_weighted_1():
    assert format_prompt("a red circle", [(2, 5, 1.5)]) == "a (red:1.5) circle"
    assert format_prompt("a red circle", [(2, 5, 0.0), (6, 12, 0.25)]) == "a (red:0) (circle:0.25)"
    assert format_prompt("a red circle", [(2, 5, 2), (6, 12, 1.0)]) == "a (red:2) circle"  # weight 1: plain
    assert format_prompt("a red circle", [(1, 6, 3.0)]) == "a (red:3) circle"  # edge whitespace outside
    assert format_prompt("a red circle", [(1, 2, 3.0)]) == "a red circle"  # only whitespace: nothing to weight
    assert format_prompt("", []) == ""


def test_format_prompt_escapes_and_writes_weights_without_exponents():
    assert format_prompt(r"a (red) [b]: c\d", []) == r"a \(red\) \[b\]\: c\\d"
    assert format_prompt("(x):1", [(0, 3, 2.0)]) == r"(\(x\):2)\:1"
    assert format_prompt("red", [(0, 3, 1e-05)]) == "(red:0.00001)"
    assert format_prompt("red", [(0, 3, 1e16)]) == "(red:10000000000000000)"
    assert format_prompt("red", [(0, 3, 1.1 * 1.1)]) == "(red:1.2100000000000002)"  # exact, to read back


ROUND_TRIP = [
    ("a red circle", [(2, 5, 1.5), (6, 12, 0.5)]),
    (r"a (red) [blue]: x\y", [(2, 7, 2.0), (8, 14, 0.0), (15, 19, 1.0)]),
    ("ratio 1:2, (x) [y] \\ z", [(0, 9, 1.1 * 1.1), (11, 18, 1 / 1.1), (19, 20, 3.0)]),
    ("héllo 日本 world", [(0, 5, 1 / 3), (6, 8, 123.456), (9, 14, 1e-05)]),
    ("abc", [(0, 1, 2.0), (1, 2, 3.0), (2, 3, 2.0)]),  # touching spans of different weights
]


@pytest.mark.parametrize("text, spans", ROUND_TRIP, ids=[case[0] for case in ROUND_TRIP])
def test_format_prompt_round_trips_plain_text_and_spans(text, spans):
    parsed = parse_prompt(format_prompt(text, spans))
    assert parsed.text == text
    assert parsed.weights == tuple(span for span in spans if span[2] != 1)  # floats exactly


@pytest.mark.parametrize("written", [case[0] for case in GOOD + A1111])
def test_format_prompt_round_trips_what_parse_prompt_gives(written):
    parsed = parse_prompt(written)
    again = parse_prompt(format_prompt(parsed.text, parsed.weights))
    assert again.text == parsed.text
    assert again.weights == tuple(span for span in parsed.weights if span[2] != 1)


def test_format_prompt_rejects_bad_spans_and_weights():
    for spans in ([(2, 5, 2.0), (4, 6, 2.0)], [(6, 8, 2.0), (0, 1, 2.0)], [(0, 13, 2.0)], [(3, 2, 2.0)]):
        with pytest.raises(ValueError, match="out of order, overlapping or outside"):
            format_prompt("a red circle", spans)
    for weight in (-1.0, float("nan"), float("inf"), "2", True):
        with pytest.raises(UserError, match="finite number, 0 or more"):
            format_prompt("a red circle", [(2, 5, weight)])


def test_set_word_weight_writes_the_word_and_keeps_the_others():
    assert set_word_weight("a red circle", "red", 1.5) == "a (red:1.5) circle"
    assert set_word_weight("a (red:2) circle", "red", 1) == "a red circle"
    assert set_word_weight("a (red:2) circle", "circle", 0) == "a (red:2) (circle:0)"
    assert set_word_weight("red, RED red", "red#2", 2.5) == "red, (RED:2.5) red"
    assert set_word_weight("(red, blue:0.5)!", "blue", 2) == "(red:0.5), (blue:2)!"  # a group split word by word
    assert set_word_weight(r"a \(red\) [circle]: \\", "red", 3) == r"a \((red:3)\) (circle:0.9090909090909091)\: \\"
    assert set_word_weight("(red:10)dish, x", "x", 2) == "(reddish:10), (x:2)"  # whole words, as the model weights them


def test_set_word_weight_keeps_every_other_words_weight():
    written = "a ((red:1.5) circle) on the [far (left)], (ratio 1\\:2:0.5)"
    before = parse_prompt(written)
    after = parse_prompt(set_word_weight(written, "on", 0.75))
    assert after.text == before.text
    for word in split_words(before.text):
        expected = 0.75 if word.label == "on" else before.weight_at(word.start, word.end)
        assert after.weight_at(word.start, word.end) == expected, word.label


def test_set_word_weight_errors():
    with pytest.raises(UserError, match="no word 'green'"):
        set_word_weight("a red circle", "green", 2)
    for weight in (-0.5, float("nan"), float("inf"), None):
        with pytest.raises(UserError, match="finite number, 0 or more"):
            set_word_weight("a red circle", "red", weight)
    with pytest.raises(PromptSyntaxError, match="unbalanced"):
        set_word_weight("a red) circle", "red", 2)


# --- tokens ---------------------------------------------------------------------------------------


def test_rare_word_is_split_into_several_tokens(tokenizer):
    pieces = tokenizer.tokenize("zebra")
    assert len(pieces) >= 3, pieces
    assert tokenizer.tokenize("red") == ["red</w>"]


def test_token_word_index_subwords_repeats_punctuation_and_specials(tokenizer):
    prompt = "a zebra, a Red red"
    words = split_words(prompt)
    offsets = offsets_of(tokenizer, prompt)
    index = token_word_index(offsets, words)
    assert len(index) == T
    n_zebra = len(tokenizer.tokenize("zebra"))
    expected = [None, 0] + [1] * n_zebra + [None, 2, 3, 4] + [None] * (T - 6 - n_zebra)  # start, ..., end + padding
    assert index == expected
    assert [word.label for word in words] == ["a", "zebra", "a#2", "Red", "red#2"]
    # a list of pairs works the same
    assert token_word_index(offsets.tolist(), words) == index
    assert word_tokens(offsets, words)[1] == list(range(2, 2 + n_zebra))


def test_token_word_index_truncated_words_get_no_tokens(tokenizer):
    prompt = "a red circle on the left a blue square on the right a green triangle"  # one token a word
    words = split_words(prompt)
    offsets = offsets_of(tokenizer, prompt)
    index = token_word_index(offsets, words)
    assert index[0] is None and index[-1] is None  # start and the end token that replaced the cut text
    assert index[1 : T - 1] == list(range(T - 2))
    tokens = word_tokens(offsets, words)
    assert all(tokens[i] == [i + 1] for i in range(T - 2))
    assert all(tokens[i] == [] for i in range(T - 2, len(words)))


def test_token_word_index_rejects_a_batch(tokenizer):
    with pytest.raises(ValueError, match="index the batch"):
        token_word_index(offsets_of(tokenizer, "a red")[None], split_words("a red"))


def test_word_token_weights(tokenizer):
    parsed = parse_prompt("a (zebra, red:1.5) (ci:0)rcle!")
    assert parsed.text == "a zebra, red circle!"
    offsets = offsets_of(tokenizer, parsed.text)
    weights = word_token_weights(parsed, offsets, T)
    assert weights.shape == (T,) and weights.dtype == torch.float32
    n_zebra = len(tokenizer.tokenize("zebra"))
    n_circle = len(tokenizer.tokenize("circle"))
    expected = [1.0, 1.0] + [1.5] * n_zebra + [1.5, 1.5] + [0.0] * n_circle + [1.0]  # comma in the span, '!' not
    expected += [1.0] * (T - len(expected))  # end and padding
    assert weights.tolist() == expected


def test_word_token_weights_apply_to_every_subword_and_pad_short_offsets(tokenizer):
    parsed = parse_prompt("a (zebra:2)")
    unpadded = tokenizer(parsed.text, return_offsets_mapping=True)["offset_mapping"]
    weights = word_token_weights(parsed, unpadded, T)
    n_zebra = len(tokenizer.tokenize("zebra"))
    assert weights.tolist() == [1.0, 1.0] + [2.0] * n_zebra + [1.0] * (T - 2 - n_zebra)


def test_delete_tokens_removes_whole_words_and_their_spaces(tokenizer):
    for prompt, gone, expected in [
        ("a red circle on the left", {"red"}, "a circle on the left"),
        ("a zebra and a red circle", {"zebra", "red"}, "a and a circle"),
        ("a red circle, on the left", {"left"}, "a red circle, on the"),
        ("a red circle", set(), "a red circle"),
    ]:
        offsets = offsets_of(tokenizer, prompt)
        spans = [(w.start, w.end) for w in split_words(prompt) if w.text in gone]
        drop = [end > start and any(s <= start and end <= e for s, e in spans) for start, end in offsets.tolist()]
        assert delete_tokens(prompt, offsets, drop) == expected, prompt


# --- alignment ------------------------------------------------------------------------------------


def align(tokenizer, source, target):
    return align_tokens(offsets_of(tokenizer, source), source, offsets_of(tokenizer, target), target, T)


def test_align_same_prompt_is_identity(tokenizer):
    for prompt in ["a red circle, on the left!", "", "a zebra and a zebra", "a red circle on the left " * 3]:
        assert align(tokenizer, prompt, prompt).tolist() == list(range(T)), prompt


def test_align_word_swap_keeps_every_position(tokenizer):
    mapping = align(tokenizer, "a red circle on the left", "a blue circle on the left")
    assert mapping.tolist() == list(range(T))
    mapping = align(tokenizer, "a red circle on the left", "A GREEN circle on the right")
    assert mapping.tolist() == list(range(T))


def test_align_inserted_word_gets_minus_one(tokenizer):
    source, target = "a red circle", "a big red circle"
    n_big = len(tokenizer.tokenize("big"))
    assert n_big > 1
    mapping = align(tokenizer, source, target).tolist()
    # start, a, big..., red, circle, end, padding
    assert mapping == [0, 1] + [-1] * n_big + [2, 3] + list(range(4, 4 + T - 4 - n_big))
    # the other way round "big" is deleted: unused, and the rest maps back
    back = align(tokenizer, target, source).tolist()
    assert back == [0, 1, 2 + n_big, 3 + n_big] + [min(4 + n_big + k, T - 1) for k in range(T - 4)]


def test_align_multi_token_words(tokenizer):
    n_zebra = len(tokenizer.tokenize("zebra"))
    # the same split word at a new position: token i -> token i
    mapping = align(tokenizer, "a zebra circle", "a big zebra circle").tolist()
    n_big = len(tokenizer.tokenize("big"))
    zebra_at = 2 + n_big
    assert mapping[zebra_at : zebra_at + n_zebra] == list(range(2, 2 + n_zebra))
    assert mapping[zebra_at + n_zebra] == 2 + n_zebra  # circle
    # a swap between words of different token counts: every piece takes the source word's first token
    mapping = align(tokenizer, "a red circle", "a zebra circle").tolist()
    assert mapping[: 3 + n_zebra] == [0, 1] + [2] * n_zebra + [3]
    mapping = align(tokenizer, "a zebra circle", "a red circle").tolist()
    assert mapping[:4] == [0, 1, 2, 2 + n_zebra]


def test_align_unequal_replacement_and_truncation(tokenizer):
    # one word replaced by two: no positional counterpart, so -1 for both
    mapping = align(tokenizer, "a red circle", "a green big circle").tolist()
    n_green, n_big = len(tokenizer.tokenize("green")), len(tokenizer.tokenize("big"))
    assert mapping[: 2 + n_green + n_big + 1] == [0, 1] + [-1] * (n_green + n_big) + [3]
    # two replaced by two: word to word in order
    mapping = align(tokenizer, "a red square", "a green big").tolist()
    assert mapping[: 2 + n_green + n_big] == [0, 1] + [2] * n_green + [3] * n_big
    # a source truncated to T tokens: its end token is at T-1, and padding clips there
    long = "a red circle on the left a blue square on the right a green triangle"
    mapping = align(tokenizer, long, "a red circle").tolist()
    assert mapping == [0, 1, 2, 3] + [T - 1] * (T - 4)


def test_with_text_encoder_tokenize(tokenizer):
    config = clip_text_config(tokenizer, 16, 1, 2, intermediate_size=32)
    encoder = TextEncoder(tokenizer, CLIPTextModel(config))
    prompts = [parse_prompt("a (red:2) zebra"), parse_prompt("a (blue:2) zebra")]
    offsets = encoder.tokenize([prompt.text for prompt in prompts])["offsets"]  # (B, T, 2)
    words = split_words(prompts[0].text)
    n_zebra = len(tokenizer.tokenize("zebra"))
    assert token_word_index(offsets[0], words)[: 3 + n_zebra + 1] == [None, 0, 1] + [2] * n_zebra + [None]
    assert word_token_weights(prompts[0], offsets[0], encoder.max_length)[:4].tolist() == [1.0, 1.0, 2.0, 1.0]
    mapping = align_tokens(offsets[0], prompts[0].text, offsets[1], prompts[1].text, encoder.max_length)
    assert mapping.tolist() == list(range(T))
