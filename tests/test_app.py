"""Tests for the editor: its model side (diffusion/editor/service.py) and views (views.py) without a
browser, and app.py's page itself in headless Chromium."""

import io
import os
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bench import bench_editor_load as load
from diffusion.editor import service, views
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
    return service.Editor.load(tiny_model, device="cpu")


# ---- without a browser -----------------------------------------------------------------------
def test_a_released_slider_rewrites_the_prompt_in_the_weighting_syntax():
    assert service.reweight("a red circle", 1, 0) == "a (red:0) circle"
    assert service.reweight("a (red:0) circle", 1, 1) == "a red circle"  # 1 = unchanged: no brackets
    weighted = "a (red:1.2100000000000002) (circle:1.5)"  # exactly 1.1 * 1.1
    assert service.reweight("a ((red)) circle", 2, 1.5) == weighted
    assert service.reweight("a red circle and a red square", 5, 2) == "a red circle and a (red:2) square"  # red#2
    assert service.reweight("a red circle", 1, 0.15000000000000002) == "a (red:0.15) circle"  # slider float noise


def test_typed_weights_set_the_sliders():
    words = service.word_weights("a (red:1.5) [circle] on the (left:7)")
    assert [(w.label, w.weight) for w in words] == [
        ("a", 1.0),
        ("red", 1.5),
        ("circle", 1 / 1.1),
        ("on", 1.0),
        ("the", 1.0),
        ("left", 7.0),
    ]
    states = views.slider_states(words, None)
    assert len(states) == views.SLIDERS
    assert [s["label"] for s in states[:6]] == ["a", "red", "circle", "on", "the", "left"]
    assert states[1]["value"] == 1.5 and states[1]["maximum"] == views.MAX_WEIGHT
    assert states[5]["maximum"] == 7.0  # a weight past the slider's range widens it
    assert "not rendered" in states[0]["info"]
    assert all(s == {"visible": False} for s in states[6:])


def test_a_long_prompt_fills_the_slider_pool_and_no_more():
    words = service.word_weights(" ".join(f"w{i}" for i in range(views.SLIDERS + 4)))
    assert sum(s["visible"] for s in views.slider_states(words, None)) == views.SLIDERS


def test_render_gives_the_pipelines_images_and_maps_and_one_map_per_word_and_step(editor, tiny_model):
    settings = service.Settings(seed=3, steps=4, num_images=2)
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
    last = editor.render("a red circle", service.Settings(steps=2))
    view = views.update(editor, "a (red:abc) circle", service.Settings(steps=2), last)
    assert view.result is last
    message = view.error.removeprefix('<pre class="prompt-error">').removesuffix("</pre>").splitlines()
    assert message[0] == "malformed prompt: bad weight &#x27;abc&#x27; (expected a number like 1.5) at column 8"
    assert message[1].index("abc") == message[2].index("^")
    prompt, view = views.update_weight(editor, "a (red circle", 1, 2.0, service.Settings(steps=2), last)
    assert prompt == "a (red circle" and view.result is last and "never closed" in view.error
    view = views.update(editor, "a red circle", service.Settings(steps=2, num_images=9), last)
    assert view.result is last and "between 1 and 4" in view.error
    prompt, view = views.update_weight(editor, "a red circle", 1, 0, service.Settings(steps=2), last)
    assert prompt == "a (red:0) circle" and view.error == "" and view.result.output.prompts == [prompt]


def test_swap_returns_source_and_edit_with_their_word_maps(editor):
    source, edit = editor.swap("a red circle", "a blue circle", 0.5, service.Settings(steps=2))
    assert list(source.output.attention_maps[0]) == ["a", "red", "circle"]
    assert list(edit.output.attention_maps[0]) == ["a", "blue", "circle"]
    assert views.swap_html(source, edit).count('class="result-image"') == 2


def test_downloads_carry_the_prompt_settings_and_raw_maps(editor, tmp_path):
    from safetensors.torch import load_file

    result = editor.render("a (red:2) circle", service.Settings(steps=2, seed=7))
    files = service.write_downloads({"image": result}, tmp_path, editor.model)
    assert sorted(f.name for f in files) == ["image-000.png", "image-maps-000.png", "image-maps-000.safetensors"]
    metadata = Image.open(tmp_path / "image-000.png").text
    assert metadata["prompt"] == "a (red:2) circle" and metadata["seed"] == "7" and metadata["steps"] == "2"
    assert metadata["mixed_precision"] == result.output.settings["mixed_precision"]
    maps = load_file(tmp_path / "image-maps-000.safetensors")
    assert all(torch.equal(maps[word], result.output.attention_maps[0][word]) for word in ("a", "red", "circle"))


def test_small_batches_take_the_precision_chosen_for_them(tiny_model):
    pipeline = Pipeline.from_pretrained(tiny_model, device="cpu", mixed_precision="bf16")
    editor = service.Editor(pipeline, "model", small_batch_precision="no")
    assert [editor.precision(rows) for rows in (1, 2, 4, 8)] == ["no", "no", "bf16", "bf16"]
    assert editor.precision_note() == "float32 for UNet calls of up to 2 rows, bf16 above"
    timed = service.Editor(pipeline, "model")  # timed at start-up: float32 only where clearly faster
    assert set(timed.unet_ms) == {"no", "bf16"}
    assert timed.small_batch_precision == ("no" if timed.unet_ms["no"] <= 0.9 * timed.unet_ms["bf16"] else "bf16")


def test_a_compiled_editor_renders_what_an_uncompiled_one_does(capsys):
    uncompiled = service.Editor.load(SMALL_MODEL, device="cpu", mixed_precision="no")
    compiled = service.Editor.load(SMALL_MODEL, device="cpu", mixed_precision="no")
    assert compiled.compile() > 0 and compiled.compiled and not uncompiled.compiled
    assert compiled.precision_note() == "float32 for every UNet call, compiled for one image with guidance"
    settings = service.Settings(steps=4, seed=2)
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
    monkeypatch.setattr(service.Editor, "render_milliseconds", lambda self, precisions: render_ms)
    pipeline = Pipeline.from_pretrained(SMALL_MODEL, device="cpu", mixed_precision="bf16")
    timed = service.Editor(pipeline, "model")
    timed.compile()
    faster = min(render_ms, key=render_ms.get)
    assert timed.small_batch_precision == faster and timed.compiled
    assert [p for p, pipe in timed.pipelines.items() if pipe.fast_unet is not None] == [faster]
    timing = "(a render: bf16 " + f"{render_ms['bf16']:.0f} ms, float32 {render_ms['no']:.0f} ms)"
    expected = {
        "bf16": "bf16 for every UNet call",
        "no": "float32 for UNet calls of up to 2 rows, bf16 above",
    }[faster]
    assert timed.precision_note() == f"{expected}, compiled for one image with guidance {timing}"
    chosen = service.Editor(pipeline, "model", small_batch_precision="no")  # chosen, not timed: kept
    monkeypatch.setattr(service.Editor, "render_milliseconds", lambda self, precisions: pytest.fail("timed"))
    chosen.compile()
    assert chosen.small_batch_precision == "no" and chosen.pipelines["no"].fast_unet is not None


def test_render_milliseconds_times_each_precision_and_leaves_the_choice_alone():
    pipeline = Pipeline.from_pretrained(SMALL_MODEL, device="cpu", mixed_precision="bf16")
    editor = service.Editor(pipeline, "model", small_batch_precision="bf16")
    rendered = []
    render = editor._render
    editor._render = lambda pipe, prompt, settings: rendered.append(pipe.precision) or render(pipe, prompt, settings)
    ms = editor.render_milliseconds({p: editor.pipelines[p] for p in ("bf16", "no")}, repeats=2)
    assert set(ms) == {"bf16", "no"} and all(value > 0 for value in ms.values())
    assert rendered == ["bf16", "no"] * 3  # in turn, a first render each not counted
    assert editor.small_batch_precision == "bf16"


def test_an_editor_whose_compile_fails_stays_uncompiled_and_says_so(capsys, monkeypatch):
    from diffusion.editor.compiled import CompiledUNet

    def no_compiler(*args, **kwargs):
        raise RuntimeError("Compiler: cc is not found\nmore detail")

    editor = service.Editor.load(SMALL_MODEL, device="cpu", mixed_precision="no")
    monkeypatch.setattr(CompiledUNet, "__call__", no_compiler)
    editor.compile()
    assert not editor.compiled
    assert capsys.readouterr().out.strip() == (
        "warning: torch.compile failed (Compiler: cc is not found); renders stay uncompiled"
    )
    assert editor.status() == "renders: uncompiled (torch.compile failed: Compiler: cc is not found)"
    assert editor.render("a red circle", service.Settings(steps=2)).output.images


def test_the_editor_remembers_its_recent_encodings(editor):
    encoder = editor.pipeline.encoder  # the one encoder of every precision's pipeline
    assert all(pipeline.encoder is encoder for pipeline in editor.pipelines.values())
    encoder.encode(["a red circle", ""])
    assert ("a red circle", "") in encoder._remembered
    assert len(encoder._remembered) <= service.ENCODINGS


def test_the_command_line_fails_in_one_line(run_cli, tmp_path):
    for args in (["--port", "abc"], ["--model", tmp_path / "missing"], ["--port", "0"], ["--threads", "0"]):
        result = run_cli("app.py", *args)
        assert result.returncode == 2, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


class SlowCompile:
    """A stand-in for `CompiledUNet` whose first call waits until the test lets it go (the minute
    of a real compile), then runs the eager UNet; it counts its calls."""

    def __init__(self, unet, batch_sizes=None):
        self.unet, self.calls = unet, 0
        SlowCompile.made.append(self)

    def __call__(self, *args, **kwargs):
        if self.calls == 0:
            assert SlowCompile.release.wait(60)
        self.calls += 1
        return self.unet(*args, **kwargs)


def test_renders_run_uncompiled_while_compiling_in_the_background_then_compiled(monkeypatch):
    import threading

    SlowCompile.made, SlowCompile.release = [], threading.Event()
    monkeypatch.setattr(service, "CompiledUNet", SlowCompile)
    editor = service.Editor.load(SMALL_MODEL, device="cpu", mixed_precision="no")
    assert editor.status() == "renders: uncompiled"
    thread = editor.compile_in_background()
    try:
        assert editor.status() == "renders: uncompiled (compiling in the background…)"
        assert "compiling in the background" in views.status_html(editor)
        settings = service.Settings(steps=3, seed=4)
        result = editor.render("a (red:0.5) circle", settings)  # while the compile waits: the eager UNet
        assert not editor.compiled and all(pipe.fast_unet is None for pipe in editor.pipelines.values())
        expected = Pipeline.from_pretrained(SMALL_MODEL, device="cpu", mixed_precision="no")(
            "a (red:0.5) circle", seed=4, steps=3, attention_maps=True, progress=False
        )
        assert np.array_equal(np.asarray(result.output.images[0]), np.asarray(expected.images[0]))
        assert all(torch.equal(result.output.attention_maps[0][w], m) for w, m in expected.attention_maps[0].items())
    finally:
        SlowCompile.release.set()
        thread.join(60)
    assert editor.compiled and not editor.compiling
    assert editor.status() == "renders: compiled, float32"
    (made,) = SlowCompile.made
    assert editor.pipelines["no"].fast_unet is made
    calls = made.calls
    editor.render("a red circle", service.Settings(steps=3))
    assert made.calls == calls + 3  # a render after the switch runs on it


def test_the_page_answers_before_the_compile_is_done():
    pytest.importorskip("gradio")
    with load.serve(SMALL_MODEL, compile=True, timeout=120) as server:
        # the page answers as soon as Gradio listens; app.py says it compiles a moment later
        deadline = time.monotonic() + 30
        while "in the background" not in server.log_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        log = server.log_text()
        assert "compiling the UNet for one-image renders in the background" in log
        assert "compiled in" not in log  # the page answered first
        with urllib.request.urlopen(server.url + "/", timeout=30) as response:
            assert response.status == 200


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
            # the status line: which UNet renders run on (uncompiled unless EDITOR_TEST_COMPILE=1)
            if os.environ.get("EDITOR_TEST_COMPILE") != "1":
                expect(page.locator("#status")).to_have_text("renders: uncompiled")

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

            assert edit_metadata()["prompt"] == service.DEFAULT_EDIT and edit_metadata()["keep_layout"] == "on"
            first = edit_link.get_attribute("href")
            page.locator("#keep-layout").get_by_label("off").check()
            page.locator("#swap-button").click()
            expect(edit_link).not_to_have_attribute("href", first)
            assert edit_metadata()["keep_layout"] == "off"
        finally:
            browser.close()
