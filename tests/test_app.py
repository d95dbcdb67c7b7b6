"""Tests for app.py: the editor's model-facing functions, and the page itself in headless Chromium."""

import io
import os
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import app
from bench import bench_editor_load as load
from diffusion.sampling.pipeline import Pipeline, Weighting

REPO = Path(__file__).resolve().parents[1]
SMALL_MODEL = REPO / "tests" / "assets" / "small-shapes"  # 16 px, follows its prompts
CHROMIUM = "/usr/bin/chromium"  # Debian's; Playwright cannot download its own browsers here
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.fixture(scope="module")
def editor(tiny_model):
    return app.Editor.load(tiny_model, device="cpu")


# ---- without a browser -----------------------------------------------------------------------
def test_a_released_slider_rewrites_the_prompt_in_the_weighting_syntax():
    assert app.reweight("a red circle", 1, 0) == "a (red:0) circle"
    assert app.reweight("a (red:0) circle", 1, 1) == "a red circle"  # 1 = unchanged: no brackets
    assert app.reweight("a ((red)) circle", 2, 1.5) == "a (red:1.2100000000000002) (circle:1.5)"  # exactly 1.1 * 1.1
    assert app.reweight("a red circle and a red square", 5, 2) == "a red circle and a (red:2) square"  # red#2
    assert app.reweight("a red circle", 1, 0.15000000000000002) == "a (red:0.15) circle"  # slider float noise


def test_typed_weights_set_the_sliders():
    words = app.word_weights("a (red:1.5) [circle] on the (left:7)")
    assert [(w.label, w.weight) for w in words] == [
        ("a", 1.0),
        ("red", 1.5),
        ("circle", 1 / 1.1),
        ("on", 1.0),
        ("the", 1.0),
        ("left", 7.0),
    ]
    states = app.slider_states(words, None)
    assert len(states) == app.SLIDERS
    assert [s["label"] for s in states[:6]] == ["a", "red", "circle", "on", "the", "left"]
    assert states[1]["value"] == 1.5 and states[1]["maximum"] == app.MAX_WEIGHT
    assert states[5]["maximum"] == 7.0  # a weight past the slider's range widens it
    assert "not rendered" in states[0]["info"]
    assert all(s == {"visible": False} for s in states[6:])


def test_a_long_prompt_fills_the_slider_pool_and_no_more():
    words = app.word_weights(" ".join(f"w{i}" for i in range(app.SLIDERS + 4)))
    assert sum(s["visible"] for s in app.slider_states(words, None)) == app.SLIDERS


def test_render_gives_the_pipelines_images_and_maps_and_one_map_per_word_and_step(editor, tiny_model):
    settings = app.Settings(seed=3, steps=4, num_images=2)
    prompt = "a (red:0) circle on the left"
    result = editor.render(prompt, settings)
    reference = Pipeline.from_pretrained(
        tiny_model, device="cpu", mixed_precision=editor.precision(settings.unet_batch(2))
    )
    expected = reference(
        prompt, num_images_per_prompt=2, seed=3, steps=4, attention_maps=True, weighting=Weighting(), progress=False
    )
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(result.output.images, expected.images))
    for maps, expected_maps, step_maps in zip(result.output.attention_maps, expected.attention_maps, result.step_maps):
        assert list(maps) == ["a", "red", "circle", "on", "the", "left"]
        assert all(torch.equal(maps[word], expected_maps[word]) for word in maps)
        for word, history in step_maps.items():  # one map per step, and they average to the total
            assert history.shape == (4, 16, 16)
            torch.testing.assert_close(history.mean(0), maps[word])
    assert result.maps(0, step=2)["red"].shape == (16, 16)
    assert sum(result.shares().values()) == pytest.approx(1)


def test_a_bad_prompt_keeps_the_last_result_and_shows_the_caret(editor):
    last = editor.render("a red circle", app.Settings(steps=2))
    view = app.update(editor, "a (red:abc) circle", app.Settings(steps=2), last)
    assert view.result is last
    message = view.error.removeprefix('<pre class="prompt-error">').removesuffix("</pre>").splitlines()
    assert message[0] == "malformed prompt: bad weight &#x27;abc&#x27; (expected a number like 1.5) at column 8"
    assert message[1].index("abc") == message[2].index("^")
    prompt, view = app.update_weight(editor, "a (red circle", 1, 2.0, app.Settings(steps=2), last)
    assert prompt == "a (red circle" and view.result is last and "never closed" in view.error
    view = app.update(editor, "a red circle", app.Settings(steps=2, num_images=9), last)
    assert view.result is last and "between 1 and 4" in view.error
    prompt, view = app.update_weight(editor, "a red circle", 1, 0, app.Settings(steps=2), last)
    assert prompt == "a (red:0) circle" and view.error == "" and view.result.output.prompts == [prompt]


def test_swap_returns_source_and_edit_with_their_word_maps(editor):
    source, edit = editor.swap("a red circle", "a blue circle", 0.5, app.Settings(steps=2))
    assert list(source.output.attention_maps[0]) == ["a", "red", "circle"]
    assert list(edit.output.attention_maps[0]) == ["a", "blue", "circle"]
    assert app.swap_html(source, edit).count('class="result-image"') == 2


def test_downloads_carry_the_prompt_settings_and_raw_maps(editor, tmp_path):
    from safetensors.torch import load_file

    result = editor.render("a (red:2) circle", app.Settings(steps=2, seed=7))
    files = app.write_downloads({"image": result}, tmp_path, editor.model)
    assert sorted(f.name for f in files) == ["image-000.png", "image-maps-000.png", "image-maps-000.safetensors"]
    metadata = Image.open(tmp_path / "image-000.png").text
    assert metadata["prompt"] == "a (red:2) circle" and metadata["seed"] == "7" and metadata["steps"] == "2"
    assert metadata["mixed_precision"] == result.output.settings["mixed_precision"]
    maps = load_file(tmp_path / "image-maps-000.safetensors")
    assert all(torch.equal(maps[word], result.output.attention_maps[0][word]) for word in ("a", "red", "circle"))


def test_small_batches_take_the_precision_chosen_for_them(tiny_model):
    pipeline = Pipeline.from_pretrained(tiny_model, device="cpu", mixed_precision="bf16")
    editor = app.Editor(pipeline, "model", small_batch_precision="no")
    assert [editor.precision(rows) for rows in (1, 2, 4, 8)] == ["no", "no", "bf16", "bf16"]
    assert editor.precision_note() == "float32 for UNet calls of up to 2 rows, bf16 above"
    timed = app.Editor(pipeline, "model")  # timed at start-up: float32 only where clearly faster
    assert set(timed.unet_ms) == {"no", "bf16"}
    assert timed.small_batch_precision == ("no" if timed.unet_ms["no"] <= 0.9 * timed.unet_ms["bf16"] else "bf16")


def test_a_compiled_editor_renders_what_an_uncompiled_one_does(capsys):
    uncompiled = app.Editor.load(SMALL_MODEL, device="cpu", mixed_precision="no")
    compiled = app.Editor.load(SMALL_MODEL, device="cpu", mixed_precision="no")
    assert compiled.compile() > 0 and compiled.compiled and not uncompiled.compiled
    assert compiled.precision_note() == "float32 for every UNet call, compiled for one image with guidance"
    settings = app.Settings(steps=4, seed=2)
    for prompt in ("a (red:0) circle on the left", "a red circle"):
        a, b = (editor.render(prompt, settings) for editor in (uncompiled, compiled))
        assert np.abs(np.asarray(a.output.images[0], int) - np.asarray(b.output.images[0], int)).max() <= 2
        assert a.step_maps[0].keys() == b.step_maps[0].keys()
        assert all(torch.allclose(a.step_maps[0][w], b.step_maps[0][w], atol=1e-4) for w in a.step_maps[0])
    assert "torch.compile failed" not in capsys.readouterr().out


@pytest.mark.parametrize("render_ms", [{"bf16": 150.0, "no": 200.0}, {"bf16": 210.0, "no": 160.0}])
def test_compiling_a_timed_editor_keeps_the_precision_that_renders_faster_compiled(monkeypatch, render_ms):
    from diffusion.editor.compiled import CompiledUNet

    monkeypatch.setattr(CompiledUNet, "__call__", lambda self, *args, **kwargs: self.unet(*args, **kwargs))
    monkeypatch.setattr(app.Editor, "render_milliseconds", lambda self, precisions: render_ms)
    pipeline = Pipeline.from_pretrained(SMALL_MODEL, device="cpu", mixed_precision="bf16")
    timed = app.Editor(pipeline, "model")
    timed.compile()
    faster = min(render_ms, key=render_ms.get)
    assert timed.small_batch_precision == faster and timed.compiled
    assert [p for p, pipe in timed.pipelines.items() if pipe.compiled_unet is not None] == [faster]
    timing = "(a render: bf16 " + f"{render_ms['bf16']:.0f} ms, float32 {render_ms['no']:.0f} ms)"
    expected = {
        "bf16": "bf16 for every UNet call",
        "no": "float32 for UNet calls of up to 2 rows, bf16 above",
    }[faster]
    assert timed.precision_note() == f"{expected}, compiled for one image with guidance {timing}"
    chosen = app.Editor(pipeline, "model", small_batch_precision="no")  # chosen, not timed: kept
    monkeypatch.setattr(app.Editor, "render_milliseconds", lambda self, precisions: pytest.fail("timed"))
    chosen.compile()
    assert chosen.small_batch_precision == "no" and chosen.pipelines["no"].compiled_unet is not None


def test_render_milliseconds_times_each_precision_and_leaves_the_choice_alone():
    pipeline = Pipeline.from_pretrained(SMALL_MODEL, device="cpu", mixed_precision="bf16")
    editor = app.Editor(pipeline, "model", small_batch_precision="bf16")
    rendered = []
    render = editor.render
    editor.render = lambda prompt, settings: rendered.append(editor.small_batch_precision) or render(prompt, settings)
    ms = editor.render_milliseconds(["bf16", "no"], repeats=2)
    assert set(ms) == {"bf16", "no"} and all(value > 0 for value in ms.values())
    assert rendered == ["bf16", "no"] * 3  # in turn, a first render each not counted
    assert editor.small_batch_precision == "bf16"


def test_an_editor_whose_compile_fails_stays_uncompiled_and_says_so(capsys, monkeypatch):
    from diffusion.editor.compiled import CompiledUNet

    def no_compiler(*args, **kwargs):
        raise RuntimeError("Compiler: cc is not found\nmore detail")

    editor = app.Editor.load(SMALL_MODEL, device="cpu", mixed_precision="no")
    monkeypatch.setattr(CompiledUNet, "__call__", no_compiler)
    editor.compile()
    assert not editor.compiled
    assert capsys.readouterr().out.strip() == (
        "warning: torch.compile failed (Compiler: cc is not found); renders stay uncompiled"
    )
    assert editor.render("a red circle", app.Settings(steps=2)).output.images


def test_the_text_encoder_cache_gives_what_the_encoder_gives(editor):
    encoder = editor.pipeline.encoder
    first = encoder.encode(["a red circle", ""])
    again = encoder.encode(["a red circle", ""])
    direct = encoder.encoder.encode(["a red circle", ""])
    assert all(torch.equal(a, b) and torch.equal(a, c) for a, b, c in zip(first, again, direct))
    again[0].zero_()  # a caller writing into its copy does not change what is remembered
    assert torch.equal(encoder.encode(["a red circle", ""])[0], direct[0])


def test_the_command_line_fails_in_one_line(run_cli, tmp_path):
    for args in (["--port", "abc"], ["--model", tmp_path / "missing"], ["--port", "0"], ["--threads", "0"]):
        result = run_cli("app.py", *args)
        assert result.returncode == 2, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


# ---- in a real browser -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server():
    """app.py on the small model (or on EDITOR_TEST_MODEL, e.g. for the README's picture), on a
    free loopback port, uncompiled unless EDITOR_TEST_COMPILE=1; yields its URL."""
    pytest.importorskip("gradio")
    pytest.importorskip("playwright.sync_api")
    model = os.environ.get("EDITOR_TEST_MODEL", str(SMALL_MODEL))
    # compiling takes a minute on 2 cores: the tests above and tests/test_compiled.py cover the
    # compiled UNet, and EDITOR_TEST_COMPILE=1 drives the compiled page here too
    with load.serve(model, compile=os.environ.get("EDITOR_TEST_COMPILE") == "1", timeout=180) as server:
        yield server.url + "/"


def test_the_page_edits_weights_shows_maps_errors_and_swaps(server, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(
            f"{CHROMIUM} is missing: install Debian's chromium (apt-get install -y chromium); .ci/run does this"
        )
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(90_000)  # renders queue behind whatever else the CPU runs
            page.goto(server)

            def image_source() -> str:
                return page.locator("#maps figure.result-image img").first.get_attribute("src")

            # a new prompt: one heat map per word
            prompt_box = page.locator('#prompt [data-testid="textbox"]')
            prompt = "a blue square on the right"
            prompt_box.fill(prompt)
            prompt_box.press("Enter")
            expect(page.locator(f'#maps .result[data-prompt="{prompt}"]')).to_be_visible()
            expect(page.locator("#maps figure.word-map")).to_have_count(6)
            before = image_source()

            # the colour word's slider to 0: type into its number box, then leave it (Gradio's release)
            number = page.get_by_label("number input for blue", exact=True)
            number.fill("0")
            number.blur()
            weighted = "a (blue:0) square on the right"
            expect(prompt_box).to_have_value(weighted)
            expect(page.locator(f'#maps .result[data-prompt="{weighted}"]')).to_be_visible()
            expect(page.locator("#maps figure.word-map")).to_have_count(6)
            assert image_source() != before, "weight 0 on the colour word left the image as it was"
            after = image_source()

            # the download is the image on screen, with its prompt in the PNG's metadata
            def downloaded_prompt() -> str:
                link = page.locator('#downloads a[download="image-000.png"]').get_attribute("href")
                with urllib.request.urlopen(link, timeout=30) as response:
                    return Image.open(io.BytesIO(response.read())).text["prompt"]

            deadline = time.monotonic() + 60  # the files are written just after the image is shown
            while downloaded_prompt() != weighted and time.monotonic() < deadline:
                time.sleep(0.2)
            assert downloaded_prompt() == weighted
            page.screenshot(path=str(tmp_path / "editor.png"), full_page=True)
            if os.environ.get("SCREENSHOT_DOCS"):  # SCREENSHOT_DOCS=1 renews the README's picture
                page.screenshot(path=str(REPO / "docs" / "editor.png"), full_page=True)

            # the step slider redraws the maps of one step without sampling again
            step_box = page.get_by_label("number input for Step of the maps", exact=True)
            step_box.fill("5")
            step_box.blur()
            expect(page.locator('#maps .result[data-step="5"]')).to_be_visible()
            assert image_source() == after

            # a malformed prompt: the message with its caret; the last image stays
            prompt_box.fill("a (red:abc) circle")
            prompt_box.press("Enter")
            error = page.locator("#error pre.prompt-error")
            expect(error).to_be_visible()
            lines = error.inner_text().splitlines()
            assert lines[0].startswith("malformed prompt: bad weight 'abc'")
            assert lines[1].index("abc") == lines[2].index("^")
            assert image_source() == after

            # the swap tab: source and edit side by side
            page.get_by_role("tab", name="Word swap").click()
            page.locator("#swap-button").click()
            expect(page.locator("#swap-view figure.result-image img")).to_have_count(2)
            page.screenshot(path=str(tmp_path / "swap.png"), full_page=True)

            # the edit's PNG records whether the layout was kept: auto keeps it for a colour swap
            edit_link = page.locator('a[href$="/edit-000.png"]').first

            def edit_metadata() -> dict:
                with Image.open(io.BytesIO(page.request.get(edit_link.get_attribute("href")).body())) as png:
                    return dict(png.info)

            assert edit_metadata()["prompt"] == app.DEFAULT_EDIT and edit_metadata()["keep_layout"] == "on"
            first = edit_link.get_attribute("href")
            page.locator("#keep-layout").get_by_label("off").check()
            page.locator("#swap-button").click()
            expect(edit_link).not_to_have_attribute("href", first)
            assert edit_metadata()["keep_layout"] == "off"
        finally:
            browser.close()
