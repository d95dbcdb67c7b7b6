"""Fuzzing with hypothesis (issue 40, part 1): whatever the input, a result or a one-line error, never a traceback.

Four inputs a user controls are fuzzed, each with a property that must hold for every case:

- prompts (`parse_prompt`): a parse or a `PromptSyntaxError` whose first line is self-contained and
  whose caret sits under the column it names; a parse rendered back (`format_prompt`,
  `set_word_weight`) parses to the same words and weights; every weight finite and >= 0; linear time;
- config overrides and YAML files (`load_config`): a valid config or a one-line `UserError`;
- the command lines of train.py, sample.py, evaluate.py and app.py: exit 0, exit 2 with one line
  on stderr (three for a malformed prompt: the line, the prompt, the caret), or arguments accepted;
- image folders (`ImageFolderDataset`): each file loads or is rejected naming it (skipped under
  skip_bad), and no file outside the folder is opened.

Each property runs a fixed number of cases (noted beside it) drawn with derandomize=True: the same
cases on every run, so that CI is reproducible (and no .hypothesis database is written). Each
failure found while writing them has a regression test with its input (`test_*_regressions`).
"""

import argparse
import contextlib
import io
import json
import math
import os
import shutil
import struct
import tempfile
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from diffusion.config import Config, load_config
from diffusion.control.prompts import (
    MAX_NESTING,
    PromptSyntaxError,
    format_prompt,
    parse_prompt,
    set_word_weight,
    split_words,
)
from diffusion.errors import UserError

REPO = Path(__file__).resolve().parents[1]
SMALL_MODEL = REPO / "tests" / "assets" / "small-shapes"  # 16 px: loads in a tenth of a second


def fuzz(cases: int):
    """Hypothesis settings of a property that runs `cases` cases, the same ones on every run."""
    return settings(
        max_examples=cases,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )


def assert_one_line(error: UserError, *fragments: str) -> None:
    message = str(error)
    assert message and len(message.splitlines()) == 1 and "\n" not in message, repr(message)
    for fragment in fragments:
        assert fragment in message, (fragment, message)


# ---- prompts ------------------------------------------------------------------------------------
SYNTAX = ["(", ")", "[", "]", ":", "\\", " ", ".", "0", "1", "5", "-", "+", "e", "\t", "\n", "\x85", "\u2028"]
SYNTAX += ["red", "a ", "circle", "日本", "e\u0301", "'s"]
# Text of the syntax's characters and words, with any character now and then.
any_prompt = st.lists(st.sampled_from(SYNTAX) | st.characters(), max_size=40).map("".join)

words = st.sampled_from(["red", "blue", "circle", "a", "on the left", "don't", "x_1", "日本", ",", " ", "\\(", "\\:"])
weights = st.sampled_from(["0", "1", "1.5", ".5", "2.", "0.001", " 1.21 ", "1" + "0" * 300, "0." + "0" * 330 + "1"])
# Prompts in the grammar (mostly well formed), so that the round trip sees weights and nesting.
well_formed = st.recursive(
    words,
    lambda inner: st.one_of(
        st.lists(inner, min_size=1, max_size=4).map(" ".join),
        inner.map(lambda text: f"({text})"),
        inner.map(lambda text: f"[{text}]"),
        st.tuples(inner, weights).map(lambda pair: f"({pair[0]}:{pair[1]})"),
    ),
    max_leaves=12,
)


def check_syntax_error(error: PromptSyntaxError, written: str) -> None:
    """Three lines: the self-contained one, the prompt, a caret under the column it names."""
    first, shown, caret = str(error).split("\n")
    assert len(str(error).splitlines()) == 3, repr(str(error))
    assert first == f"malformed prompt: {error.reason} at column {error.column}"
    assert shown == "  " + "".join(" " if c.isspace() else c for c in written)
    assert caret.strip() == "^" and caret.startswith("  ") and 1 <= error.column <= len(written)
    assert error.cli_message() == str(error)


def check_weights(parsed) -> None:
    previous_end = 0
    for start, end, weight in parsed.weights:
        assert math.isfinite(weight) and weight >= 0, parsed
        assert previous_end <= start < end <= len(parsed.text)
        previous_end = end


def word_weights(parsed) -> list[tuple[str, float]]:
    return [(w.label, parsed.weight_at(w.start, w.end)) for w in split_words(parsed.text)]


@fuzz(400)  # 400 cases
@given(any_prompt)
@example("(red:" + "9" * 400 + ")")  # regression: read as infinity
@example("((red:1" + "0" * 200 + "):1" + "0" * 200 + ")")  # regression: 1e200 * 1e200 = infinity
@example("((red:0):1" + "0" * 400 + ")")  # regression: 0 * infinity = nan
@example("(" * (MAX_NESTING + 1) + "red" + ")" * (MAX_NESTING + 1))
def test_any_prompt_parses_or_is_a_syntax_error_with_a_caret(written):
    try:
        parsed = parse_prompt(written)
    except PromptSyntaxError as error:
        check_syntax_error(error, written)
        return
    check_weights(parsed)
    again = parse_prompt(format_prompt(parsed.text, parsed.weights))
    assert again.text == parsed.text and word_weights(again) == word_weights(parsed)


@fuzz(300)  # 300 cases
@given(well_formed, st.data())
@example("(a (red:1" + "0" * 300 + ") circle:1" + "0" * 300 + ")", None)  # regression: overflow past the float range
def test_a_parsed_prompt_rendered_back_parses_to_the_same_words_and_weights(written, data):
    try:
        parsed = parse_prompt(written)
    except PromptSyntaxError as error:  # e.g. "()" around a lone space
        check_syntax_error(error, written)
        return
    check_weights(parsed)
    rendered = format_prompt(parsed.text, parsed.weights)
    again = parse_prompt(rendered)
    assert again.text == parsed.text
    assert [s for s in again.weights if s[2] != 1] == [s for s in parsed.weights if s[2] != 1]
    assert word_weights(again) == word_weights(parsed)
    labels = [w.label for w in split_words(parsed.text)]
    if labels and data is not None:
        label = data.draw(st.sampled_from(labels))
        weight = data.draw(st.floats(0, 1e6) | st.sampled_from([0.0, 1.0, 3e38, 5e-324]))
        changed = parse_prompt(set_word_weight(written, label, weight))
        expected = [(w, weight if w == label else v) for w, v in word_weights(parsed)]
        assert word_weights(changed) == expected


@pytest.mark.parametrize(
    "written",
    [
        "(" * 50_000 + ")" * 50_000,
        "[" * 100_000,
        "((a:1.5)" * 12_500,
        "(a" * 33_333 + ")" * 33_333,  # regression: took 27 s (every group's text re-weighted at each close)
        "(a" * (MAX_NESTING - 1) + "(b)" * 33_000 + ")" * (MAX_NESTING - 1),  # as deep as allowed, and long
    ],
    ids=["parens", "square", "weighted-unclosed", "nested-words", "deepest-allowed"],
)
def test_a_prompt_of_100000_brackets_returns_within_a_second(written):
    start = time.process_time()  # this process's CPU time: a busy machine does not make it fail
    with contextlib.suppress(PromptSyntaxError):
        parse_prompt(written)
    assert time.process_time() - start < 1.0  # linear: a tenth of a second at most on a laptop core


@pytest.mark.parametrize(
    "written, reason, column",
    [
        ("(red:" + "9" * 400 + ")", "is too large (over float32's 3.4e38)", 6),
        ("(red:1" + "0" * 300 + ")", "is too large (over float32's 3.4e38)", 6),  # finite, but not in float32
        ("((red:1" + "0" * 30 + "):1" + "0" * 200 + ")", "is too large (over float32's 3.4e38)", 40),
        ("((red:1" + "0" * 30 + "):1" + "0" * 30 + ")", "multiply to over float32's 3.4e38", 1),
        ("(" * (MAX_NESTING + 1) + "red" + ")" * (MAX_NESTING + 1), f"nested more than {MAX_NESTING} deep", 33),
    ],
    ids=["infinite-weight", "over-float32", "outer-over-float32", "product-over-float32", "too-deep"],
)
def test_prompt_regressions(written, reason, column):
    with pytest.raises(PromptSyntaxError) as caught:
        parse_prompt(written)
    assert reason in caught.value.reason and caught.value.column == column
    check_syntax_error(caught.value, written)
    deepest = parse_prompt("(" * MAX_NESTING + "red" + ")" * MAX_NESTING)
    assert deepest.weights == ((0, 3, math.prod([1.1] * MAX_NESTING)),)  # the deepest allowed


# ---- config overrides and YAML files -----------------------------------------------------------
def config_keys() -> list[str]:
    flat = []
    for section, values in Config().to_dict().items():
        flat += [section] + [f"{section}.{name}" for name in values]
    return flat


KEYS = config_keys()
FLOAT_KEYS = [
    f"{section}.{name}"
    for section, values in Config().to_dict().items()
    for name, value in values.items()
    if isinstance(value, float) or name in ("snr_gamma",)
]
SPECIAL_VALUES = [
    "nan", ".nan", "NaN", "inf", "-inf", ".inf", "-.inf", "infinity", "1e308", "1e309", "-1e308", "5e-324",
    str(10**400), "-" + str(10**400), "9" * 5000, str(2**63), str(2**63 - 1), str(-(2**63) - 1),
    "[]", "{}", "", " ", "\t", "null", "~", "true", "no", "yes", "0", "-1", "0.5", "1", "3",
    "[.nan]", "[.inf]", "[1e999]",
    "[1, 2]", "[16, 8]", "[32, 64, 128]", "[2.0, 5.0, 2.0, 1.0]", "[.nan, 1, 1, 1]", "['a red circle']",
    "2001-13-01", "2001-01-01", "!!int x", "!!bool x", "!!timestamp x", "!!float ''", "!!binary é",
    "!!python/object:os.system 1", "[" * 1000, "{a: 1}", "&a [*a]", "*a", "0x10", "0o17", "1_000", "1:20",
    "'quoted'", '"a\\nb"', "a: b: c", "- 1", "%YAML 1.1", "@", "`", "\x00", "\ud800", "[[1]]",
    "shapes", "imagefolder", "epsilon", "bf16", "linear",
]  # fmt: skip
values = st.sampled_from(SPECIAL_VALUES) | st.integers().map(str) | st.floats().map(repr) | st.text(max_size=12)
keys = st.sampled_from(KEYS) | st.text(max_size=12) | st.sampled_from(KEYS).map(lambda key: key + ".x")
overrides = st.lists(st.tuples(keys, values).map("=".join) | st.text(max_size=20) | st.sampled_from(KEYS), max_size=4)


def check_valid(cfg: Config) -> None:
    """What a config that loaded must be: numbers finite, integers in 64 bits, seeds >= 0."""
    for section, fields in cfg.to_dict().items():
        for name, value in fields.items():
            for item in value if isinstance(value, list) else [value]:
                if isinstance(item, float):
                    assert math.isfinite(item), (section, name, value)
                if isinstance(item, int):
                    assert -(2**63) <= item < 2**63, (section, name)
            if name.endswith("seed"):
                assert value >= 0, (section, name, value)


def load_or_error(path, strings) -> None:
    try:
        cfg = load_config(path, strings)
    except UserError as error:
        assert_one_line(error)
    else:
        check_valid(cfg)


@fuzz(500)  # 500 cases
@given(overrides)
@example(["train.lr=" + str(10**400)])  # regression: OverflowError
@example(["train.timestep_bias_multiplier=0", "train.num_train_timesteps=" + str(10**400)])  # regression: OverflowError
@example(["model.channels=" + "[" * 1000])  # regression: RecursionError
@example(["data.path=2001-13-01"])  # regression: ValueError (a 13th month)
@example(["train.lr=!!bool x"])  # regression: KeyError
@example(["train.\nlr=1"])  # regression: a message of two lines
@example(["data.object_weights=[.nan, 1, 1, 1]"])  # regression: loaded (then NaN probabilities in training)
@example(["train.seed=" + str(2**70)])  # regression: loaded (then an overflow in torch.Generator)
@example(["text.seed=-1"])  # regression: loaded (then numpy's default_rng refuses it)
def test_any_overrides_load_a_valid_config_or_raise_one_line(strings):
    load_or_error(None, strings)


yaml_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.sampled_from([10**400, -(10**400), 2**63])
    | st.floats()
    | st.text(max_size=10)
)
yaml_values = st.recursive(
    yaml_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=8), inner),
    max_leaves=10,
)
# A config: sections of known keys (by their last part) and unknown ones, holding any values.
config_files = st.dictionaries(
    st.sampled_from(["model", "text", "data", "train"]) | st.text(max_size=8),
    st.dictionaries(st.sampled_from([key.split(".")[-1] for key in KEYS]) | st.text(max_size=8), yaml_values)
    | yaml_values,
    max_size=4,
)


@fuzz(250)  # 250 cases
@given(
    config_files.map(lambda d: yaml.safe_dump(d).encode())
    | st.binary(max_size=60)
    | st.text(max_size=60).map(str.encode)
)
@example("train:\n  lr: " + "9" * 400 + "\n")  # regression: OverflowError
@example(b"train: {lr: 1}\n# \xff\xfe\n")  # regression: UnicodeDecodeError
@example(b"train: {seed: !!int x}\n")  # regression: ValueError from PyYAML's constructor
@example(  # regression: a "billion laughs" alias bomb (9**9 numbers), quoted whole in the message
    "train:\n  lr:\n    - &a [1, 2, 3, 4, 5, 6, 7, 8, 9]\n"
    + "".join(f"    - &{b} [{', '.join([f'*{a}'] * 9)}]\n" for a, b in zip("abcdefgh", "bcdefghi"))
)
def test_any_yaml_file_loads_a_valid_config_or_raises_one_line(content):
    content = content.encode() if isinstance(content, str) else content
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "config.yaml"
        path.write_bytes(content)
        start = time.process_time()
        load_or_error(path, [])
        assert time.process_time() - start < 5


@pytest.mark.parametrize("key", FLOAT_KEYS)
@pytest.mark.parametrize("value", ["nan", "inf", "-inf", str(10**400)])
def test_every_numeric_setting_rejects_nan_and_infinity(key, value):
    """Per key family: no number in a config may be NaN or infinite (a learning rate, a weight, a
    fraction, a probability, a guidance scale: none of them means anything there)."""
    with pytest.raises(UserError) as caught:
        load_config(None, [f"{key}={value}"])
    assert_one_line(caught.value, key)


@pytest.mark.parametrize(
    "strings, fragment",
    [
        (["train.lr=" + str(10**400)], "train.lr must be a finite number, got an integer of 1329 bits"),
        (["train.max_steps=" + str(2**64)], "train.max_steps must be an integer that fits in 64 bits"),
        (["model.channels=" + "[" * 1000], "cannot parse the value"),
        (["data.path=2001-13-01"], "cannot parse the value '2001-13-01'"),
        (["train.lr=!!bool x"], "cannot parse the value"),
        (["train.\nlr=1"], "unknown config key 'train.\\nlr'; did you mean 'train.lr'?"),
        (["a\nb"], "override 'a\\nb' must look like key=value"),
        (["data.object_weights=[.nan, 1, 1, 1]"], "data.object_weights must hold finite numbers"),
        (["data.object_weights=[.inf, 1, 1, 1]"], "data.object_weights must hold finite numbers"),
        (["text.seed=-1"], "text.seed must not be negative"),
        (["train.validation_seed=-5"], "train.validation_seed must not be negative"),
    ],
    ids=[
        "huge-int-float",
        "huge-int",
        "deep-brackets",
        "bad-date",
        "bad-tag",
        "newline-key",
        "newline-override",
        "nan-list",
        "inf-list",
        "negative-seed",
        "negative-validation-seed",
    ],
)
def test_override_regressions(strings, fragment):
    with pytest.raises(UserError) as caught:
        load_config(None, strings)
    assert_one_line(caught.value, fragment)


def test_config_file_regressions(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_bytes(b"train: {lr: 1}\n# \xff\n")
    with pytest.raises(UserError) as caught:
        load_config(path, [])
    assert_one_line(caught.value, "cannot be read (not UTF-8 text)")
    path.write_text("train: {seed: !!int x}\n")
    with pytest.raises(UserError) as caught:
        load_config(path, [])
    assert_one_line(caught.value, "is not valid YAML")
    bomb = "train:\n  lr:\n    - &a [1, 2, 3, 4, 5, 6, 7, 8, 9]\n" + "".join(
        f"    - &{b} [{', '.join([f'*{a}'] * 9)}]\n" for a, b in zip("abcdefgh", "bcdefghi")
    )
    path.write_text(bomb)  # 9**9 numbers in all, if the message quoted them
    start = time.process_time()
    with pytest.raises(UserError) as caught:
        load_config(path, [])
    assert_one_line(caught.value, "train.lr must be float, got [[1, 2, 3")
    assert time.process_time() - start < 5 and len(str(caught.value)) < 300
    weird = tmp_path / "line\nbreak.yaml"
    with pytest.raises(UserError) as caught:
        load_config(weird, [])
    assert_one_line(caught.value, "line\\nbreak.yaml")


# ---- command lines ------------------------------------------------------------------------------
# Each script's main(argv) runs in this process, in an empty folder. Nothing heavy runs: a sentinel
# stands in for the first piece of real work (train.py: `training.train`; sample.py and evaluate.py:
# the UNet's forward, so the model folder is loaded, the prompts are encoded and the noise drawn;
# evaluate.py: also `report.evaluate`; app.py: `Editor.compile`, `Editor.__init__` after the model
# folder is loaded, and torch.set_num_threads, which would change this process). Reaching the
# sentinel means the arguments were accepted.


class Accepted(Exception):
    """Raised where the real work would start."""


def accept(*args, **kwargs):
    raise Accepted


def parser_of(script):
    """The ArgumentParser that `script.main` builds (caught at its parse_args)."""
    from diffusion.cli import ArgumentParser

    built = []

    def capture(self, *args, **kwargs):
        built.append(self)
        raise Accepted

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ArgumentParser, "parse_args", capture)
        with contextlib.suppress(Accepted):
            script.main([])
    return built[0]


def option_values(action, values: dict) -> st.SearchStrategy:
    """Values for one option, mostly of the kind it expects (its choices, numbers of its type,
    paths and values from `values` by its dest), now and then garbage."""
    garbage = st.text(max_size=8) | st.sampled_from(["", "-1", "nan", "inf", "1e400", str(10**30), "--", "-x"])
    if action.choices:
        expected = st.sampled_from(list(action.choices))
    elif action.dest in values:
        expected = st.sampled_from(values[action.dest])
    elif action.type is int:
        expected = (st.integers(-2, 12) | st.sampled_from([0, 2**31, 2**63, 2**64, 10**30, -(2**70)])).map(str)
    elif action.type is float:
        expected = (st.floats(-1, 12) | st.sampled_from([math.nan, math.inf, -math.inf, 1e308])).map(repr)
    else:
        expected = well_formed | any_prompt  # --edit, --negative-prompt
    return st.one_of(expected, expected, expected, garbage)


def command_lines(parser, values: dict, positionals: st.SearchStrategy, head: st.SearchStrategy):
    """Random command lines for `parser`: `head` (the options it mostly needs), then its flags with
    values (`option_values`), flags alone, positionals and garbage, in any order."""
    options = []
    for action in parser._actions:
        if not action.option_strings or isinstance(action, argparse._HelpAction):  # --help: in `garbage`
            continue
        flags = st.sampled_from(action.option_strings)
        if action.nargs == 0:
            options.append(flags.map(lambda flag: [flag]))
        else:
            options.append(st.tuples(flags, option_values(action, values)).map(list))
    options = st.one_of(options)
    positional = positionals.map(lambda value: [value])
    garbage = (st.text(max_size=6) | st.sampled_from(["--", "-", "--model", "=", "-x", "--no", "--help"])).map(
        lambda value: [value]
    )
    body = st.lists(st.one_of(options, options, options, options, positional, positional, garbage), max_size=5)
    return st.tuples(head, body).map(lambda pair: pair[0] + [token for part in pair[1] for token in part])


def run_main(script, argv) -> tuple[str, int | None, str]:
    """Run `script.main(argv)`: ('accepted', None, stderr) or ('exit', code, stderr), stderr checked."""
    stderr, stdout = io.StringIO(), io.StringIO()
    outcome = ("accepted", None)
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(stdout):
        try:
            script.main(argv)
        except Accepted:
            pass
        except SystemExit as exited:
            outcome = ("exit", exited.code)
    err = stderr.getvalue()
    assert "Traceback" not in err, (argv, err)
    if outcome == ("exit", 2):
        lines = err.splitlines()
        assert lines and lines[0].startswith("error: ") and err.endswith("\n"), (argv, err)
        if lines[0].startswith("error: malformed prompt: "):  # the line, the prompt, a caret under it
            assert len(lines) == 3 and lines[2].strip() == "^", (argv, err)
        else:
            assert len(lines) == 1, (argv, err)
    elif outcome == ("exit", 0):
        assert stdout.getvalue().startswith("usage:") and not err, (argv, err)  # --help
    else:
        assert outcome == ("accepted", None), (argv, outcome, err)
        assert not [line for line in err.splitlines() if line.startswith("error")], (argv, err)
    return (*outcome, err)


@pytest.fixture(scope="module")
def cli_folder(tmp_path_factory):
    """A folder to run the command lines in, with a few files their path options may name."""
    folder = tmp_path_factory.mktemp("cli")
    (folder / "prompts.txt").write_text("a red circle\n\n(a (blue:2) square\n")
    (folder / "binary.txt").write_bytes(b"\xff\xfe\x00bad")
    (folder / "adir").mkdir()
    (folder / "afile").write_text("a file where a folder should be")
    (folder / "bad.yaml").write_text("train: {lr: [\n")
    return folder


@contextlib.contextmanager
def command_line_sandbox(folder: Path):
    """Run in `folder`, the sentinels in place, warnings' format restored afterwards."""
    import app
    from diffusion.evaluation import report
    from diffusion.model.unet import UNet
    from diffusion.training import loop as training

    with contextlib.suppress(ImportError):  # now: importing it raises the recursion limit, which hypothesis warns of
        import gradio  # noqa: F401
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        patch.setattr(warnings, "formatwarning", warnings.formatwarning)  # one_line_warnings() sets it
        patch.setattr(training, "train", accept)
        patch.setattr(UNet, "forward", accept)
        patch.setattr(report, "evaluate", accept)
        patch.setattr(app.Editor, "__init__", accept)
        patch.setattr(app.Editor, "compile", accept)
        patch.setattr("torch.set_num_threads", lambda threads: None)
        yield
    assert sorted(p.name for p in folder.iterdir()) == ["adir", "afile", "bad.yaml", "binary.txt", "prompts.txt"]


def option_choices() -> dict:
    """Values of the options by dest: paths relative to `cli_folder`, and the scripts' own kinds."""
    return {
        "model": [str(SMALL_MODEL), str(SMALL_MODEL), "missing-model", "afile", "adir"],
        "config": [str(REPO / "configs" / "shapes.yaml"), "bad.yaml", "missing.yaml", "adir", "binary.txt"],
        "out": ["out/grid.png", "adir", "afile/x.png", "grid.png", "adir/", "report.json"],
        "attention": ["maps", "afile", "adir", "afile/maps"],
        "prompt_file": ["prompts.txt", "binary.txt", "missing.txt", "adir"],
        "output_dir": ["runs/x", "afile", "adir"],
        "resume": ["latest", "missing", "adir"],
        "device": ["cpu", "cpu", "cuda", "mps", "meta", "cuda:99", "garbage", ""],
        "host": ["127.0.0.1", "localhost"],
        "weight_steps": ["0,0.5", "0,1", "0.3,0.2", "nan,1", "0,2", "-1,0.5", "1", "a,b", "0,0.5,1"],
        "attention_resolutions": ["16,8", "8", "16", "5", "-1", "0", "16,", str(10**30)],
        "parts": ["edit,swap", "faithfulness", "samplers", "", ",", "bogus", "edit,bogus"],
        "categories": ["single object", "counting,position", "nothing", ""],
        "guidance_cutoff": ["0", "0.7", "1", "1.5", "-0.1", "nan", "x"],  # evaluate.py's is a fraction type
        "edit_steps": ["0", "0.6", "1", "1.5", "nan", "inf", "x"],
    }


def test_parsers_are_found():
    import app
    import evaluate
    import sample
    import train

    flags = {
        script.__name__: {f for a in parser_of(script)._actions for f in a.option_strings}
        for script in (train, sample, evaluate, app)
    }
    assert {"--config", "--output-dir", "--resume"} <= flags["train"]
    assert {"--model", "--edit", "--prompt-file", "--weight-steps"} <= flags["sample"]
    assert {"--model", "--parts", "--seed"} <= flags["evaluate"]
    assert {"--model", "--port", "--threads"} <= flags["app"]


def mostly(*tokens: str) -> st.SearchStrategy:
    """`tokens`, in two cases of three; else nothing."""
    return st.sampled_from([list(tokens), list(tokens), []])


MODEL = mostly("--model", str(SMALL_MODEL))
SCRIPTS = {  # script: (its positional arguments, the head of its command lines)
    "train": (st.tuples(keys, values).map("=".join), st.just([])),
    "sample": (well_formed | any_prompt, st.tuples(MODEL, mostly("a red circle")).map(lambda pair: sum(pair, []))),
    "evaluate": (st.nothing(), MODEL),
    "app": (st.nothing(), MODEL),
}


@pytest.mark.parametrize(
    "name, cases",
    [("train", 250), ("sample", 200), ("evaluate", 120), ("app", 120)],  # cases of each script
)
def test_any_command_line_exits_0_or_2_with_one_line_or_is_accepted(name, cases, cli_folder):
    import importlib.util

    script = importlib.import_module(name)
    positionals, head = SCRIPTS[name]
    argvs = command_lines(parser_of(script), option_choices(), positionals, head)
    outcomes = []

    @fuzz(cases)
    @given(argvs)
    def run(argv):
        outcomes.append(run_main(script, argv))

    with command_line_sandbox(cli_folder):
        run()
    assert len(outcomes) >= cases
    reached = {"accepted", "exit"} if name != "app" or importlib.util.find_spec("gradio") else {"exit"}
    assert {kind for kind, _, _ in outcomes} == reached  # without the app extra, app.py always says to install it


@pytest.mark.parametrize(
    "name, argv, fragment",
    [
        ("sample", ["--seed", str(2**64), "a red circle"], "--seed"),  # was: ValueError in torch.Generator
        ("sample", ["--seed", str(2**64 - 1), "-n", "2", "a red circle"], "for all 2 images"),
        ("sample", ["--device", "cuda:99", "a red circle"], "--device 'cuda:99' cannot be used here"),  # AssertionError
        ("sample", ["--device", "garbage", "a red circle"], "--device 'garbage' cannot be used here"),  # RuntimeError
        ("sample", ["--device", "meta", "a red circle"], "--device 'meta' holds no data"),
        ("evaluate", ["--device", "garbage"], "--device 'garbage' cannot be used here"),
        ("evaluate", ["--seed", "-1"], "--seed must be between 0 and 2**63 - 1"),
        ("evaluate", ["--seed", str(2**64)], "--seed must be between 0 and 2**63 - 1"),
        ("app", ["--device", "garbage"], "--device 'garbage' cannot be used here"),
        ("app", ["--threads", str(10**30)], "--threads must be between 1 and"),  # was: ValueError in torch
    ],
    ids=lambda value: value if isinstance(value, str) else None,
)
def test_command_line_regressions(name, argv, fragment, cli_folder):
    import importlib

    with command_line_sandbox(cli_folder):
        kind, code, err = run_main(importlib.import_module(name), ["--model", str(SMALL_MODEL), *argv])
    assert (kind, code) == ("exit", 2) and fragment in err, err


@pytest.mark.parametrize(
    "name, argv, fragment",
    [
        ("sample", ["--model", "a\nb", "a red circle"], "model folder 'a\\nb' not found"),  # was: two lines
        ("train", ["--config", "x\ny.yaml"], "config file 'x\\ny.yaml' not found"),
        ("train", ["train.lr=1e999"], "train.lr must be a finite number"),
    ],
)
def test_paths_with_line_breaks_stay_on_one_line(name, argv, fragment, cli_folder):
    import importlib

    with command_line_sandbox(cli_folder):
        kind, code, err = run_main(importlib.import_module(name), argv)
    assert (kind, code) == ("exit", 2) and fragment in err, err


@pytest.mark.parametrize(
    "config, fragment",
    [
        (b"[1, 2]\n", "(expected a mapping of sections, data among them)"),  # was: AttributeError
        (b"data: 5\n", "(expected a mapping of sections, data among them)"),  # was: AttributeError
        (b"data: {kind: [\n", "(not valid YAML)"),  # was: yaml's ParserError
        (b"data: {kind: shapes}\n# \xff\n", "(not UTF-8 text)"),  # was: UnicodeDecodeError
    ],
    ids=["a-list", "data-not-a-mapping", "not-yaml", "not-utf8"],
)
def test_evaluate_rejects_a_broken_config_yaml_in_the_model_folder(config, fragment, cli_folder, tmp_path):
    import evaluate

    model = tmp_path / "model"
    shutil.copytree(SMALL_MODEL, model)
    (model / "config.yaml").write_bytes(config)
    with command_line_sandbox(cli_folder):
        kind, code, err = run_main(evaluate, ["--model", str(model), "--out", str(tmp_path / "report.json")])
    assert (kind, code) == ("exit", 2) and "config.yaml' is not a config " + fragment in err, err


# ---- image folders ------------------------------------------------------------------------------
def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_claiming(width: int, height: int, depth: int = 8, colour: int = 2, rows: bytes = b"\x00" * 10) -> bytes:
    """A PNG of a few bytes whose header claims `width` x `height` pixels."""
    header = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    chunks = png_chunk(b"IHDR", header) + png_chunk(b"IDAT", zlib.compress(rows)) + png_chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + chunks


def encoded(image: Image.Image, format: str = "PNG") -> bytes:
    out = io.BytesIO()
    image.save(out, format)
    return out.getvalue()


def image_files() -> dict[str, tuple[str, bytes, bool]]:
    """kind -> (extension, content, whether it is a usable image)."""
    rgb = encoded(Image.new("RGB", (24, 20), (200, 10, 10)))
    grey16 = Image.fromarray((np.arange(480).reshape(20, 24) * 130).astype(np.uint16))
    red16 = b"".join(b"\x00" + b"\xff\xff\x00\x00\x00\x00" * 24 for _ in range(20))  # 16-bit RGB rows
    return {
        "rgb": (".png", rgb, True),
        "cmyk": (".jpg", encoded(Image.new("CMYK", (24, 20), (0, 255, 255, 0)), "JPEG"), True),
        "grey16": (".png", encoded(grey16), True),
        "rgb16": (".png", png_claiming(24, 20, depth=16, rows=red16), True),
        "palette": (".png", encoded(Image.new("RGB", (24, 20), (10, 200, 10)).convert("P")), True),
        "rgba": (".png", encoded(Image.new("RGBA", (24, 20), (10, 10, 200, 0))), True),
        "grey-alpha": (".png", encoded(Image.new("LA", (24, 20), (90, 200))), True),
        "bilevel": (".bmp", encoded(Image.new("1", (24, 20), 1), "BMP"), True),
        "truncated": (".png", rgb[: len(rgb) // 2], False),
        "zero-bytes": (".png", b"", False),
        "bomb": (".png", png_claiming(30_000, 30_000), False),  # PIL refuses it: over twice its limit
        "bomb-below-twice": (".png", png_claiming(12_000, 12_000), False),  # PIL only warns
        "not-an-image": (".png", b"\x89PNG\r\n\x1a\nthis is not really a png", False),
    }


IMAGE_FILES = image_files()
CAPTIONS = {  # kind -> (caption bytes, whether it is usable)
    "plain": (b"a red thing", True),
    "long": (b"a red thing " * 834, True),  # 10,000 characters: kept (the text encoder truncates it, warning)
    "multi-line": (b"a red\nthing\r\n", True),  # whitespace runs become one space
    "empty": (b"", False),
    "blank": (b" \n\t ", False),
    "invalid-utf8": (b"a red \xff\xfe thing", False),
}
NAMES = {  # metadata.jsonl: kind of file_name -> whether it names the image in the folder
    "plain": True,
    "in-a-subfolder": True,
    "line-break": True,  # a file called "x\ny.png": fine, and a message naming it stays on one line
    "dot-dot": False,
    "sub-dot-dot": False,
    "absolute": False,
    "missing": False,
    "not-a-string": False,
    "not-json": False,
}
entries = st.lists(
    st.tuples(
        st.sampled_from(sorted(IMAGE_FILES)) | st.binary(max_size=40),
        st.sampled_from(sorted(CAPTIONS)),
        st.sampled_from(sorted(NAMES)),
    ),
    min_size=1,
    max_size=4,
)


def write_folder(root: Path, items, metadata: bool) -> tuple[set[str], set[str], set[str]]:
    """Write the entries; return the identifiers (file names, or 'line N') of the good ones, the
    bad ones and the undecided ones (random bytes), as the dataset should name them."""
    root.mkdir()
    (root.parent / "outside.png").write_bytes(IMAGE_FILES["rgb"][1])  # a good image outside the folder
    good, bad, unknown = set(), set(), set()
    lines = []
    for index, (kind, caption_kind, name_kind) in enumerate(items):
        extension, content, usable = (".png", kind, None) if isinstance(kind, bytes) else IMAGE_FILES[kind]
        stem = f"x\ny{index}" if metadata and name_kind == "line-break" else f"img{index}"
        relative = f"sub/{stem}{extension}" if metadata and name_kind == "in-a-subfolder" else f"{stem}{extension}"
        (root / relative).parent.mkdir(exist_ok=True)
        (root / relative).write_bytes(content)
        caption, caption_usable = CAPTIONS[caption_kind]
        identifier = Path(relative).name
        if metadata:
            names = {
                "dot-dot": "../outside.png",
                "sub-dot-dot": "sub/../../outside.png",
                "absolute": str(root.parent / "outside.png"),
                "missing": f"missing{index}.png",
                "not-a-string": 7,
            }
            record = {"file_name": names.get(name_kind, relative), "text": caption.decode("utf-8", "replace")}
            line = json.dumps(record).encode()
            if name_kind == "not-json":
                line = line[:-1]
            if caption_kind == "invalid-utf8":
                line = line.replace(b"\\ufffd\\ufffd", b"\xff\xfe")  # the raw bytes in the file
            lines.append(line)
            if caption_kind == "invalid-utf8" or name_kind not in ("missing", *[k for k, ok in NAMES.items() if ok]):
                bad.add(f"line {index + 1}")  # rejected as a line of metadata.jsonl
                continue
            if name_kind == "missing":
                bad.add(f"missing{index}.png")
                continue
        else:
            (root / relative).with_suffix(".txt").write_bytes(caption)
            if caption_kind == "invalid-utf8":
                identifier = f"img{index}.txt"
        if not caption_usable or usable is False:
            bad.add(identifier)
        elif usable is None:
            unknown.add(identifier)
        else:
            good.add(identifier)
    if metadata:
        (root / "metadata.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    return good, bad, unknown


def names_of(paths) -> set[str]:
    return {Path(path).name for path in paths}


@fuzz(150)  # 150 cases, each a folder of 1-4 files, loaded with skip_bad on and off
@given(entries, st.booleans())
@example([("bomb-below-twice", "plain", "plain")], False)  # regression: decoded (432 MB) with a warning
@example([("grey16", "plain", "plain")], False)  # regression: PIL's RGB of 16-bit grey is all white
@example([("rgb", "invalid-utf8", "plain")], True)  # regression: UnicodeDecodeError reading metadata.jsonl
@example([("rgb", "empty", "plain")], True)  # regression: an empty caption was used
@example([("rgb", "plain", "line-break"), ("truncated", "plain", "line-break")], True)  # regression: two-line error
def test_any_image_folder_loads_its_good_files_and_names_each_bad_one(items, metadata):
    from diffusion.data.image_folder import ImageFolderDataset

    opened = []
    real_open = Image.open

    def recording_open(path, *args, **kwargs):
        opened.append(os.path.normpath(os.path.abspath(path)))
        return real_open(path, *args, **kwargs)

    with tempfile.TemporaryDirectory() as folder, pytest.MonkeyPatch.context() as patch:
        root = Path(folder) / "data"
        good, bad, unknown = write_folder(root, items, metadata)
        patch.setattr(Image, "open", recording_open)
        for skip_bad in (True, False):
            try:
                dataset = ImageFolderDataset(root, 16, skip_bad=skip_bad)
            except UserError as error:
                assert_one_line(error)
                message = str(error)
                if skip_bad:
                    assert not good and "no usable images" in message, message
                else:  # the first bad file
                    assert any(name.replace("\n", "\\n") in message for name in bad | unknown), message
                continue
            loaded = names_of(dataset.paths)
            assert good <= loaded <= good | unknown, (loaded, good, unknown)
            assert skip_bad or not bad
            assert all("\n" not in reason for _, reason in dataset.skipped)
            skipped = {Path(path).name for path, _ in dataset.skipped} | {
                path[path.index("line ") :] for path, _ in dataset.skipped if "metadata.jsonl line " in path
            }
            assert bad <= skipped and not (good & skipped), (bad, skipped)
            for i in range(len(dataset)):
                assert dataset.captions()[i].strip()
                image = dataset.image(i)
                assert image.shape == (16, 16, 3) and image.dtype == np.uint8
        assert all(path.startswith(str(root) + os.sep) for path in opened), opened


def test_image_folder_regressions(tmp_path):
    from diffusion.data.image_folder import ImageFolderDataset

    root = tmp_path / "data"
    root.mkdir()
    (root / "bomb.png").write_bytes(png_claiming(12_000, 12_000))  # 144 million pixels, under twice PIL's limit
    (root / "bomb.txt").write_text("a bomb")
    with pytest.raises(UserError) as caught:
        ImageFolderDataset(root, 16)
    assert_one_line(caught.value, "bomb.png", "exceeds limit")
    (root / "bomb.png").unlink()
    (root / "grey.png").write_bytes(IMAGE_FILES["grey16"][1])
    (root / "grey.txt").write_text("a grey ramp")
    grey = ImageFolderDataset(root, 16).image(0)
    assert 60 < grey.mean() < 190  # the ramp's top bytes, not all white (255) as PIL's convert("RGB") gives
    (root / "grey.txt").write_text("   \n")
    with pytest.raises(UserError) as caught:
        ImageFolderDataset(root, 16)
    assert_one_line(caught.value, "grey.png: empty caption")
    (root / "grey.txt").write_text("a grey ramp")
    (root / "metadata.jsonl").write_bytes(b'{"file_name": "grey.png", "text": "a \xff ramp"}\n')
    with pytest.raises(UserError) as caught:
        ImageFolderDataset(root, 16)
    assert_one_line(caught.value, "metadata.jsonl line 1: not valid UTF-8")
    (root / "metadata.jsonl").write_text(json.dumps({"file_name": "x\ny.png", "text": "t"}) + "\n")
    with pytest.raises(UserError) as caught:
        ImageFolderDataset(root, 16)
    assert_one_line(caught.value, "x\\ny.png: image file not found")
