r"""Prompts as words: weighting syntax, words and their tokens, token alignment between prompts.

Prompt-weighting syntax
-----------------------
`parse_prompt` turns a prompt written with weights into the plain text the model sees plus
weighted character spans of that text. The syntax is the AUTOMATIC1111 web UI's
(`parse_prompt_attention` in its modules/prompt_parser.py), minus its tolerance of malformed input:

    a (red:1.5) circle on the [far left]  ->  text  "a red circle on the far left"
                                               spans "red" x 1.5, "far left" x 1/1.1

- `(text)` multiplies the weight of `text` by 1.1, `[text]` divides it by 1.1 (multiplies by
  1/1.1, as A1111 does). `text` is one word or several.
- `(text:weight)` multiplies it by `weight` instead of 1.1.
- Groups nest, and their factors multiply: `((red))` is 1.1 * 1.1, `((red:1.5) circle)` gives
  `red` 1.5 * 1.1 and `circle` 1.1, `[(red:2)]` gives `red` 2 / 1.1. The factors are multiplied
  in the order the groups close, innermost first, as A1111 does, so the floats are A1111's.
  Groups nest at most 32 deep (`MAX_NESTING`), which keeps parsing linear in the prompt's length.
- A group keeps its whitespace in the text, but whitespace at the edges of a run of equally
  weighted characters is not weighted: `a ( red :2) b` gives the text `a  red  b` with the
  weight on `red`. A group must hold something besides whitespace.
- The weight is a non-negative decimal: digits with an optional fraction, or a fraction alone:
  `1`, `1.5`, `.5`, `2.`, `0` (0 is allowed). Whitespace around it is ignored: `(red: 1.5 )`.
  Signs, exponents and anything else are errors: `-1`, `+1`, `1e3`, `abc`, and an empty weight.
- Inside round brackets, the first `:` starts the weight, which runs to the next `)`. Outside
  brackets, `:` is an ordinary character. Inside square brackets it is an error: a weight needs
  round brackets, and A1111's `[from:to:when]` (prompt editing) is not supported.
- Escapes work anywhere: `\(` `\)` `\[` `\]` `\:` `\\` are a literal `(` `)` `[` `]` `:` `\`.
  A backslash before any other character, or at the very end, is an error.
- Everything else is literal text.

`WeightedPrompt.weights` lists the maximal runs of characters that lie inside at least one group
and share one weight (the product of their groups' factors), trimmed of whitespace at their
edges; a group with factor 1, `(red:1)`, is still listed, with weight 1.0. Characters outside
every group have weight 1.0.

Unlike A1111, which silently drops a bracket it cannot match and treats a `(` or `[` it never
sees closed as weighting the rest of the prompt, malformed input is an error here: a prompt
either means exactly what it says or is rejected.

A malformed prompt raises `PromptSyntaxError` (a `UserError`) whose message is one
self-contained line, followed by the prompt and a caret under the offending character:

    malformed prompt: bad weight 'abc' (expected a number like 1.5) at column 8
      a (red:abc) circle
             ^

Columns are 1-based positions in the prompt as written. The errors, and where the caret points:

    unbalanced ')'  /  unbalanced ']'                    the closer with no opener before it
    '(' is never closed  /  '[' is never closed          the innermost opener left open
    mismatched ']' (the '(' at column N needs ')')       the closer (also ')' closing a '[')
    nothing to weight in '()'  /  ... in '[]'            the opener of an empty or blank group
    nothing to weight before ':'                         the '(' of '(:1.5)' or '(  :1.5)'
    ':' inside '[...]' (a weight needs round brackets;   the ':' of '[red:1.5]' or '[a:b:5]'
        prompt editing '[a:b:n]' is not supported; ...)
    missing weight after ':' (expected a number ...)     the ')' of '(red:)'
    bad weight '<w>' (expected a number like 1.5)        the weight's first character
    weight '<w>' is too large (over float32's 3.4e38)    the weight's first character
    the weights of the nested groups multiply to over    the opener of the group whose factor
        float32's 3.4e38                                 takes the product past float32's largest
    groups nested more than 32 deep                      the opener of the 33rd
    negative weight '<w>' (weights are 0 or more)        the '-'
    unknown escape '\<c>' (only \( \) \[ \] \: \\ ...)   the backslash
    dangling '\' at the end                              the backslash

`format_prompt` writes plain text and spans back in this syntax, and `set_word_weight` rewrites
a prompt with one word's weight changed (for an editor that weights words by clicking them).

Words and tokens
----------------
A word is a maximal run of letters, digits, underscores and apostrophes (`[\w']+`), so
punctuation is never a word. Repeated words (compared case-insensitively) are told apart by
their labels: `red`, `red#2`, `red#3`, ...

Tokens are tied to words only through the tokenizer's character offsets (`TextEncoder.tokenize`
gives them, (0, 0) for start, end and padding tokens), never by decoding token strings: a token
belongs to the word its character span overlaps, so all sub-word pieces of a rare word belong
to that word, and words cut off by truncation simply have no tokens.
"""

import difflib
import itertools
import math
import re
import unicodedata
from dataclasses import dataclass
from decimal import Decimal

import torch

from diffusion.errors import UserError

__all__ = [
    "COLOUR_WORDS",
    "SIZE_WORDS",
    "PromptSyntaxError",
    "WeightedPrompt",
    "Word",
    "align_tokens",
    "find_word",
    "format_prompt",
    "object_phrase",
    "parse_prompt",
    "set_word_weight",
    "swap_kind",
    "split_words",
    "token_word_index",
    "word_token_weights",
    "word_tokens",
]

_ESCAPABLE = "()[]:\\"
_CLOSER = {"(": ")", "[": "]"}
# A1111's factors: `(text)` multiplies by 1.1, `[text]` by 1 / 1.1 (not a division, for its floats).
_FACTOR = {"(": 1.1, "[": 1 / 1.1}
_NUMBER = r"(?:\d+(?:\.\d*)?|\.\d+)"
FLOAT32_MAX = 3.4028234663852886e38  # the largest weight: weights act in float32 tensors
_WORD = re.compile(r"[\w']+")
# Words and runs of punctuation: what token alignment matches between two prompts.
_UNIT = re.compile(r"[\w']+|[^\w'\s]+")


class PromptSyntaxError(UserError):
    """A prompt whose weighting syntax is malformed.

    reason: what is wrong, e.g. "unbalanced ')'".
    column: 1-based column in `prompt` of the offending character.
    prompt: the prompt as written.

    The message is `malformed prompt: <reason> at column N`, then the prompt and a caret line.
    """

    def __init__(self, prompt: str, index: int, reason: str):
        self.prompt = prompt
        self.column = index + 1
        self.reason = reason
        # The caret line must stay under the prompt line: show whitespace (tabs, newlines) as
        # single spaces and pad by display width (wide CJK characters take two columns).
        shown = "".join(" " if char.isspace() else char for char in prompt)
        pad = sum(_display_width(char) for char in shown[:index])
        super().__init__(f"malformed prompt: {reason} at column {self.column}\n  {shown}\n  {' ' * pad}^")

    def cli_message(self) -> str:
        """The message as a command line prints it: its three lines (each holds no line break)."""
        return str(self)


def _display_width(char: str) -> int:
    """Terminal columns a character takes: 0 for combining marks, 2 for wide ones, else 1."""
    if unicodedata.combining(char):
        return 0
    return 2 if unicodedata.east_asian_width(char) in "WF" else 1


def _one_line(text: str) -> str:
    """`text` with every whitespace character shown as a space, to quote it in a one-line reason."""
    return "".join(" " if char.isspace() else char for char in text)


@dataclass(frozen=True)
class WeightedPrompt:
    """A prompt parsed by `parse_prompt`.

    text: the plain prompt the model sees (brackets and weights removed, escapes resolved).
    weights: `(start, end, weight)` character spans of `text`, non-overlapping, in order: the
        maximal runs of bracketed characters with one weight, whitespace at their edges left out.
        Weight 1.0 runs, like `(red:1)`, are listed too; unbracketed text is not.
    """

    text: str
    weights: tuple[tuple[int, int, float], ...] = ()

    def weight_at(self, start: int, end: int) -> float:
        """The weight of the characters `[start, end)` of `text`.

        1.0 if no weighted span overlaps them; otherwise the weight of the weighted span that
        overlaps them most (the first on a tie), so a word with only part of it in brackets,
        like `(red:2)dish`, takes that weight.
        """
        best, best_overlap = 1.0, 0
        for span_start, span_end, weight in self.weights:
            overlap = min(end, span_end) - max(start, span_start)
            if overlap > best_overlap:
                best, best_overlap = weight, overlap
        return best


# Groups nest at most this deep. A character's weight is the product of its groups' factors,
# multiplied innermost first as A1111 does (so the floats are A1111's): one multiplication per
# group around it, which the limit keeps linear in the prompt's length. `((((red))))` is 4 deep.
MAX_NESTING = 32


@dataclass
class _Group:
    """A group of the prompt: its bracket, where it is, the group around it and, once it closes, its factor."""

    bracket: str  # "(" or "["
    at: int  # index of the bracket in the prompt as written
    start: int  # index in the plain text where the group's text starts
    parent: int  # index of the enclosing group in the parse's list of groups, -1 at the top level
    factor: float = 1.0  # 1.1, 1 / 1.1 or the written weight, set when the group closes


def parse_prompt(text: str) -> WeightedPrompt:
    """Parse the prompt-weighting syntax (module docstring) into plain text and weighted spans.

    text: a prompt as the user wrote it, e.g. "a (red:1.5) circle".

    Returns a `WeightedPrompt`; a prompt without brackets or backslashes comes back unchanged with
    no spans. Raises PromptSyntaxError if the syntax is malformed, its message pointing at the column.
    Takes time linear in the prompt's length, whatever it holds.
    """
    if not isinstance(text, str):
        raise UserError(f"a prompt must be text, got {type(text).__name__} {text!r}; quote it in the config")
    out: list[str] = []  # characters of the plain text
    owner: list[int] = []  # for each character of `out`, the innermost group it was written in (-1: none)
    groups: list[_Group] = []  # every group, in the order they open
    opened: list[int] = []  # the groups we are inside (indices into `groups`), outermost first
    visible = -1  # index in `out` of the last character that is not whitespace
    i = 0
    while i < len(text):
        char = text[i]
        if char in "([":
            if len(opened) == MAX_NESTING:
                raise PromptSyntaxError(text, i, f"groups nested more than {MAX_NESTING} deep")
            groups.append(_Group(char, i, len(out), opened[-1] if opened else -1))
            opened.append(len(groups) - 1)
            i += 1
            continue
        if char in ")]":
            group = _close(text, i, groups, opened, visible)
            group.factor = _FACTOR[group.bracket]
            i += 1
            continue
        if char == ":" and opened:
            group, close = _close_weighted(text, i, groups, opened, visible)
            group.factor = _parse_weight(text, i + 1, close)
            i = close + 1
            continue
        if char == "\\":
            char = _escaped(text, i)
            i += 2
        else:
            i += 1
        out.append(char)
        owner.append(opened[-1] if opened else -1)
        if not char.isspace():
            visible = len(out) - 1
    if opened:
        group = groups[opened[-1]]
        raise PromptSyntaxError(text, group.at, f"'{group.bracket}' is never closed")
    plain = "".join(out)
    return WeightedPrompt(plain, _weighted_runs(text, plain, owner, groups))


def _escaped(text: str, i: int) -> str:
    """The literal character that the backslash at `text[i]` escapes; PromptSyntaxError if none."""
    if i + 1 == len(text):
        raise PromptSyntaxError(text, i, "dangling '\\' at the end")
    escaped = text[i + 1]
    if escaped not in _ESCAPABLE:
        raise PromptSyntaxError(
            text, i, f"unknown escape '\\{_one_line(escaped)}' (only \\( \\) \\[ \\] \\: \\\\ are escapes)"
        )
    return escaped


def _close(text: str, i: int, groups: list[_Group], opened: list[int], visible: int) -> _Group:
    """Close the innermost group with the `)` or `]` at `text[i]`; it must match and hold some text.

    visible: the index in the plain text of its last character that is not whitespace."""
    closer = text[i]
    if not opened:
        raise PromptSyntaxError(text, i, f"unbalanced '{closer}'")
    group = groups[opened[-1]]
    needed = _CLOSER[group.bracket]
    if closer != needed:
        raise PromptSyntaxError(
            text, i, f"mismatched '{closer}' (the '{group.bracket}' at column {group.at + 1} needs '{needed}')"
        )
    if visible < group.start:
        raise PromptSyntaxError(text, group.at, f"nothing to weight in '{group.bracket}{closer}'")
    opened.pop()
    return group


def _close_weighted(text: str, i: int, groups: list[_Group], opened: list[int], visible: int) -> tuple[_Group, int]:
    """Close the innermost group at the `:` at `text[i]`: the group and the index of the `)` ending its weight.

    The weight runs from the `:` to the next `)`, whatever lies between (`_parse_weight` judges it).
    visible: as `_close`'s.
    """
    group = groups[opened[-1]]
    if group.bracket == "[":
        raise PromptSyntaxError(
            text,
            i,
            "':' inside '[...]' (a weight needs round brackets, '(red:1.5)'; prompt editing "
            "'[a:b:n]' is not supported; write '\\:' for a literal ':')",
        )
    close = text.find(")", i + 1)
    if close == -1:
        raise PromptSyntaxError(text, group.at, "'(' is never closed")
    if visible < group.start:
        raise PromptSyntaxError(text, group.at, "nothing to weight before ':'")
    opened.pop()
    return group, close


def _weighted_runs(text: str, plain: str, owner: list[int], groups: list[_Group]) -> tuple[tuple[int, int, float], ...]:
    """The spans of `WeightedPrompt.weights` from the parse of `text`: the plain text, the innermost
    group of each of its characters and the groups.

    Each character's weight is the product of its groups' factors, multiplied in closing order
    (innermost first) from 1.0 as A1111's `multiply_range` does; computed once per group. The
    spans are the maximal runs of characters inside some group with one weight, trimmed of
    whitespace, whitespace-only runs left out. PromptSyntaxError if a product overflows.
    """
    weights = {-1: 1.0}  # group index -> the weight of the characters written directly inside it

    def weight(group: int) -> float:
        if group not in weights:
            product, outer = 1.0, group
            while outer != -1:
                product *= groups[outer].factor
                if product > FLOAT32_MAX:
                    raise PromptSyntaxError(
                        text, groups[outer].at, "the weights of the nested groups multiply to over float32's 3.4e38"
                    )
                outer = groups[outer].parent
            weights[group] = product
        return weights[group]

    runs = []
    for (in_group, run_weight), run in itertools.groupby(
        range(len(plain)), lambda k: (owner[k] != -1, weight(owner[k]))
    ):
        positions = list(run)
        start, end = _trim(plain, positions[0], positions[-1] + 1)
        if in_group and start < end:
            runs.append((start, end, run_weight))
    return tuple(runs)


def _trim(text: str, start: int, end: int) -> tuple[int, int]:
    """`[start, end)` without the whitespace at its edges (start == end if it is all whitespace)."""
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


def _parse_weight(text: str, start: int, close: int) -> float:
    """The weight written in `text[start:close]` (between ':' and ')'); PromptSyntaxError if malformed."""
    raw = text[start:close]
    written = raw.strip()
    if not written:
        raise PromptSyntaxError(text, close, "missing weight after ':' (expected a number like 1.5)")
    column = start + len(raw) - len(raw.lstrip())
    if re.fullmatch(_NUMBER, written):
        if float(written) > FLOAT32_MAX:
            raise PromptSyntaxError(text, column, f"weight '{written}' is too large (over float32's 3.4e38)")
        return float(written)
    if re.fullmatch("-" + _NUMBER, written):
        raise PromptSyntaxError(text, column, f"negative weight '{written}' (weights are 0 or more)")
    raise PromptSyntaxError(text, column, f"bad weight '{_one_line(written)}' (expected a number like 1.5)")


def format_prompt(text: str, weights) -> str:
    """Write plain text and weighted spans in the weighting syntax: the inverse of `parse_prompt`.

    text: the plain text, e.g. "a red circle".
    weights: `(start, end, weight)` character spans of `text`, in order, not overlapping.

    Every span whose weight is not 1 is written `(span:weight)`, whitespace at its edges left
    outside the brackets; `( ) [ ] : \\` in the text are escaped. `parse_prompt` of the result
    gives back `text` and the spans with weight not 1, exactly (floats included), for spans as
    `parse_prompt` gives them: without whitespace at their edges, and no two touching ones of
    the same weight (which it would read as one span).

    Raises ValueError for spans out of order, overlapping or outside the text, and UserError for a
    weight that is negative or not a finite number.
    """
    parts = []
    written = previous_end = 0  # text[:written] is in parts; spans so far end by previous_end
    for start, end, weight in weights:
        if not previous_end <= start <= end <= len(text):
            raise ValueError(
                f"span ({start}, {end}) is out of order, overlapping or outside the {len(text)} characters"
            )
        _check_weight(weight)
        previous_end = end
        start, end = _trim(text, start, end)
        if start < end and weight != 1:
            parts.append(_escape(text[written:start]))
            parts.append(f"({_escape(text[start:end])}:{_format_weight(weight)})")
            written = end
    parts.append(_escape(text[written:]))
    return "".join(parts)


def _escape(text: str) -> str:
    """`text` with the syntax's special characters backslash-escaped, to be read literally."""
    return "".join("\\" + char if char in _ESCAPABLE else char for char in text)


def _format_weight(weight: float) -> str:
    """The shortest decimal that reads back as exactly `weight`, without an exponent: 1.5, 0, 0.00001."""
    written = format(Decimal(repr(float(weight))), "f")
    return written.rstrip("0").rstrip(".") if "." in written else written


def _check_weight(weight) -> None:
    """UserError unless `weight` is a finite number >= 0."""
    number = isinstance(weight, (int, float)) and not isinstance(weight, bool)
    if not number or not math.isfinite(weight) or not 0 <= weight <= FLOAT32_MAX:
        raise UserError(f"a weight must be a finite number, 0 or more (at most 3.4e38), got {weight!r}")


@dataclass(frozen=True)
class Word:
    """One word of a prompt.

    text: the word as in the prompt, e.g. "red".
    start, end: its `[start, end)` character span in the prompt.
    occurrence: 1 for the first "red" in the prompt, 2 for the second, ... (case-insensitive).
    label: "red" for the first occurrence, "red#2" for the second, ...
    """

    text: str
    start: int
    end: int
    occurrence: int
    label: str


def split_words(prompt: str) -> list[Word]:
    """The words of a plain prompt (e.g. `WeightedPrompt.text`): maximal runs of `[\\w']`, in order."""
    seen: dict[str, int] = {}
    words = []
    for match in _WORD.finditer(prompt):
        key = match.group().lower()
        seen[key] = occurrence = seen.get(key, 0) + 1
        label = match.group() if occurrence == 1 else f"{match.group()}#{occurrence}"
        words.append(Word(match.group(), match.start(), match.end(), occurrence, label))
    return words


def find_word(words: list[Word], label: str) -> int:
    """The index in `words` of the word with this label (case-insensitive).

    "red" (or "red#1") is the first "red", "red#2" the second, ... Raises UserError if there is
    no such word, its message listing the labels there are.
    """
    wanted = label.strip().lower()
    if re.fullmatch(r".+#1", wanted):
        wanted = wanted[:-2]
    for index, word in enumerate(words):
        if word.label.lower() == wanted:
            return index
    labels = [word.label for word in words]
    if not labels:
        raise UserError(f"no word '{label}' in the prompt: it has no words")
    close = difflib.get_close_matches(wanted, [item.lower() for item in labels], n=1)
    hint = f"did you mean '{labels[[item.lower() for item in labels].index(close[0])]}'? " if close else ""
    raise UserError(f"no word '{label}' in the prompt; {hint}its words are: {', '.join(labels)}")


def set_word_weight(prompt: str, label: str, weight: float) -> str:
    """`prompt` rewritten so that the word with this label has `weight` and every other word keeps its own.

    prompt: a prompt in the weighting syntax, e.g. "a ((red)) circle".
    label: the word, as `split_words` labels it: "red", "red#2", ...
    weight: the new weight, a finite number >= 0.

    The result is written by `format_prompt` with one span a word: each word takes the weight
    the model would give it (`WeightedPrompt.weight_at` its span), brackets are rewritten as
    `(word:w)`, and the characters between words are kept, unweighted. Raises PromptSyntaxError
    if `prompt` is malformed, UserError if no word has this label or the weight is bad.
    """
    _check_weight(weight)
    parsed = parse_prompt(prompt)
    words = split_words(parsed.text)
    chosen = find_word(words, label)
    spans = [
        (word.start, word.end, weight if index == chosen else parsed.weight_at(word.start, word.end))
        for index, word in enumerate(words)
    ]
    return format_prompt(parsed.text, spans)


def _spans(offsets, length: int | None = None) -> list[tuple[int, int]]:
    """Token character spans of one prompt as (start, end) ints, padded with (0, 0) to `length`."""
    if isinstance(offsets, torch.Tensor):
        if offsets.ndim != 2 or offsets.shape[-1] != 2:
            raise ValueError(
                f"offsets must be (T, 2) for one prompt, got shape {tuple(offsets.shape)}; index the batch"
            )
        spans = [(int(start), int(end)) for start, end in offsets.tolist()]
    else:
        spans = [(int(start), int(end)) for start, end in offsets]
    if length is not None:
        if len(spans) > length:
            raise ValueError(f"{len(spans)} token offsets for length {length}; tokenize to at most {length} tokens")
        spans += [(0, 0)] * (length - len(spans))
    return spans


def _assign(spans: list[tuple[int, int]], units) -> list[int | None]:
    """For each token span, the index of the unit (anything with start/end) it overlaps most, or None.

    Empty spans (start, end and padding tokens) and spans overlapping no unit give None.
    """
    owners: list[int | None] = []
    for token_start, token_end in spans:
        owner, best = None, 0
        if token_end > token_start:
            for index, unit in enumerate(units):
                if unit.start >= token_end:
                    break  # units are in order: none further on can overlap
                overlap = min(token_end, unit.end) - max(token_start, unit.start)
                if overlap > best:
                    owner, best = index, overlap
        owners.append(owner)
    return owners


def token_word_index(offsets: torch.Tensor | list, words: list[Word]) -> list[int | None]:
    """For each token of one prompt, the index into `words` of the word it belongs to.

    offsets: (T, 2) character spans of the prompt's tokens, as `TextEncoder.tokenize` gives
        (`tokens["offsets"][b]`) or a list of (start, end) pairs.
    words: `split_words` of the same prompt.

    Returns T entries: the word index, or None for start, end and padding tokens and for tokens
    that are not part of a word (punctuation). A token belongs to the word its span overlaps
    (the one it overlaps most, in the odd case of two).
    """
    return _assign(_spans(offsets), words)


def word_tokens(offsets: torch.Tensor | list, words: list[Word]) -> list[list[int]]:
    """For each word, the positions of its tokens (several for a split word, none if truncated away)."""
    positions: list[list[int]] = [[] for _ in words]
    for position, owner in enumerate(token_word_index(offsets, words)):
        if owner is not None:
            positions[owner].append(position)
    return positions


def word_token_weights(prompt: WeightedPrompt, offsets: torch.Tensor | list, length: int) -> torch.Tensor:
    """The weight of each token: (length,) float32, 1.0 by default.

    prompt: the parsed prompt; `offsets` must come from tokenizing `prompt.text`.
    offsets: (T, 2) token character spans, T <= length (fewer: the rest count as padding).
    length: tokens per prompt T.

    A word's weight (`prompt.weight_at` its span) goes to every one of its sub-word tokens, so a
    rare word split into pieces is weighted whole. A token outside words (punctuation) takes
    the weight at its own span. Start, end and padding tokens stay 1.0.
    """
    spans = _spans(offsets, length)
    words = split_words(prompt.text)
    weights = torch.ones(length)
    for position, (owner, (start, end)) in enumerate(zip(_assign(spans, words), spans)):
        if owner is not None:
            weights[position] = prompt.weight_at(words[owner].start, words[owner].end)
        elif end > start:
            weights[position] = prompt.weight_at(start, end)
    return weights


def delete_tokens(text: str, offsets: torch.Tensor | list, drop) -> str:
    """`text` with the characters of the tokens where `drop` is True removed, and the runs of
    spaces this leaves collapsed: `delete_tokens("a red circle", offsets, <"red">)` is
    "a circle". Tokens are whole words or pieces of one, so whole words go.

    offsets: (T, 2) token character spans of `text` (as `TextEncoder.tokenize` gives).
    drop: (T,) bools (a tensor or a list), True at the tokens to delete.
    """
    keep = [True] * len(text)
    for (start, end), gone in zip(_spans(offsets), drop):
        if gone:
            keep[start:end] = [False] * (end - start)
    return " ".join("".join(c for c, k in zip(text, keep) if k).split())


# English's basic colour terms and the shapes set's colours, and size words. A word swap between
# two colour words is a recolouring (the user means the same outlines in another colour); between
# two size words a resizing (the same object, drawn anew at the new size): `swap_kind`.
COLOUR_WORDS = frozenset(
    "red green blue yellow purple orange pink brown black white grey gray cyan magenta violet".split()
)
SIZE_WORDS = frozenset("small large big little tiny huge".split())
# Words that end a noun phrase ("a small red circle | on the left"): articles, prepositions,
# conjunctions. Punctuation ends one too.
PHRASE_ENDS = frozenset(
    "a an the and or but in on at to of with by for from into onto above below under over near beside behind "
    "between next".split()
)


def _changed_words(prompt: str, offsets, flags) -> set[str]:
    """The lower-cased words of `prompt` holding a token whose flag is set, articles left out."""
    words = split_words(prompt)
    index = token_word_index(offsets, words)
    return {words[w].text.lower() for w, flag in zip(index, flags) if flag and w is not None} - {"a", "an"}


def swap_kind(
    source_prompt: str,
    source_offsets: torch.Tensor | list,
    source_changed: torch.Tensor | list,
    target_prompt: str,
    target_offsets: torch.Tensor | list,
    target_changed: torch.Tensor | list,
) -> str | None:
    """What a word swap changes: "recolour" when the words holding a changed token (per token,
    as `attention_control.changed_tokens` gives) are colour words (COLOUR_WORDS) on both sides,
    "resize" when they are size words (SIZE_WORDS), else None. The article may change with them
    ("an orange" -> "a red"); adding or deleting a word is neither."""
    source = _changed_words(source_prompt, source_offsets, source_changed)
    target = _changed_words(target_prompt, target_offsets, target_changed)
    for kind, vocabulary in (("recolour", COLOUR_WORDS), ("resize", SIZE_WORDS)):
        if source and target and source <= vocabulary and target <= vocabulary:
            return kind
    return None


def object_phrase(prompt: str, offsets: torch.Tensor | list, changed: torch.Tensor | list) -> list[bool]:
    """Per token of `prompt`: whether it belongs to the phrase of the first changed word, that word
    and the words after it up to the end of the noun phrase (PHRASE_ENDS, punctuation or the end
    of the prompt): in "a small red circle on the left" with "small" changed, "small red circle"."""
    words = split_words(prompt)
    index = token_word_index(offsets, words)
    flags = [bool(f) for f in changed]
    first = next((t for t, (w, f) in enumerate(zip(index, flags)) if f and w is not None), None)
    if first is None:
        return [False] * len(index)
    start = end = index[first]
    while end + 1 < len(words) and words[end + 1].text.lower() not in PHRASE_ENDS:
        if prompt[words[end].end : words[end + 1].start].strip():  # punctuation between them
            break
        end += 1
    return [w is not None and start <= w <= end for w in index]


def align_tokens(
    source_offsets: torch.Tensor | list,
    source_prompt: str,
    target_offsets: torch.Tensor | list,
    target_prompt: str,
    length: int,
) -> torch.Tensor:
    """Which source token each target token corresponds to, for Prompt-to-Prompt edits.

    source_offsets, target_offsets: (T, 2) token character spans of each prompt, as
        `TextEncoder.tokenize` gives (T <= length; missing positions count as padding).
    source_prompt, target_prompt: the plain prompts the offsets index into.
    length: tokens per prompt T.

    Returns `mapping`, (length,) long: target token j takes source token `mapping[j]`'s
    attention, or -1 where it has no counterpart.

    The words (and punctuation runs) of the two prompts are aligned with
    `difflib.SequenceMatcher` on their lower-cased texts:

    - equal words map token to token: token i to token i when both have the same number of
      tokens, otherwise every target token to the source word's first token;
    - a replaced block of as many target words as source words (a swap like red -> blue) maps
      word to word in order, tokens as above: this is what keeps the layout in a word swap;
    - inserted target words (and replaced blocks of a different size) get -1; deleted source
      words are simply unused.

    The start token maps to the start token. The end token and the padding after it map to
    the source's end token and padding: the k-th position after the target's last real token
    goes to the k-th position after the source's last real token, clipped to length - 1.
    """
    source_spans = _spans(source_offsets, length)
    target_spans = _spans(target_offsets, length)
    source_units = list(_UNIT.finditer(source_prompt))
    target_units = list(_UNIT.finditer(target_prompt))
    source_tokens = _unit_tokens(source_spans, source_units)
    target_tokens = _unit_tokens(target_spans, target_units)
    # Only the words up to the last one holding a token take part: the words past the text
    # encoder's cut have no token to map, and difflib's matching grows far faster than linearly
    # in the words of a long repetitive prompt (two 100 kB prompts took hours).
    source_units = source_units[: _held(source_tokens)]
    target_units = target_units[: _held(target_tokens)]

    mapping = torch.full((length,), -1, dtype=torch.long)
    matcher = difflib.SequenceMatcher(
        None,
        [unit.group().lower() for unit in source_units],
        [unit.group().lower() for unit in target_units],
        autojunk=False,
    )
    for tag, source_from, source_to, target_from, target_to in matcher.get_opcodes():
        if tag == "equal" or (tag == "replace" and source_to - source_from == target_to - target_from):
            for source_unit, target_unit in zip(range(source_from, source_to), range(target_from, target_to)):
                sources, targets = source_tokens[source_unit], target_tokens[target_unit]
                if not sources:
                    continue  # the source word was truncated away: nothing to take
                for k, target in enumerate(targets):
                    mapping[target] = sources[k] if len(sources) == len(targets) else sources[0]

    # Special tokens: start -> start; end and padding by their distance past the last real token.
    source_last, target_last = _last_real(source_spans), _last_real(target_spans)
    mapping[0] = 0
    for position in range(target_last + 1, length):
        mapping[position] = min(source_last + position - target_last, length - 1)
    return mapping


def _unit_tokens(spans, units) -> list[list[int]]:
    """For each unit (a regex match), the positions of the tokens that belong to it."""
    positions: list[list[int]] = [[] for _ in units]
    spans_of_units = [_Span(unit.start(), unit.end()) for unit in units]
    for position, owner in enumerate(_assign(spans, spans_of_units)):
        if owner is not None:
            positions[owner].append(position)
    return positions


@dataclass(frozen=True)
class _Span:
    start: int
    end: int


def _held(unit_tokens: list[list[int]]) -> int:
    """How many units, from the first, reach the last unit that holds a token."""
    return max((unit + 1 for unit, tokens in enumerate(unit_tokens) if tokens), default=0)


def _last_real(spans) -> int:
    """Position of the last token with a non-empty span; 0 (the start token) if there is none."""
    return max((position for position, (start, end) in enumerate(spans) if end > start), default=0)
