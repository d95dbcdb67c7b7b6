"""A live attention editor in the browser: weight each word of a prompt with a slider, see what
every word attends to at each sampling step, and swap words with Prompt-to-Prompt.

    pip install -e ".[app]"
    python app.py --model runs/shapes/model [--port 7860] [--host 127.0.0.1] [--threads 1] [--no-compile]

The model side (`Editor`, `Settings`, `Result`, `word_weights`) and the HTML views
(`result_html`, `swap_html`) need no Gradio: bench/bench_editor.py and tests/test_app.py call
them directly, and `build_page` wires them to a Gradio page. The model and its text encoder are
loaded once at start-up and kept warm, and the UNet is compiled there for one-image renders
(`Editor.compile`, diffusion/editor/compiled.py: a slider's render 1.7x faster on a 2-core CPU, images
within a level or two of the uncompiled ones); requests from several browser tabs queue and run
one at a time (the CPU has no room for two samplers at once).
"""

from __future__ import annotations

import base64
import html
import io
import itertools
import math
import os
import shutil
import statistics
import tempfile
import time
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from PIL import Image

from diffusion.cli import ArgumentParser, check_device, one_line_warnings, tune_malloc
from diffusion.config import (
    DEFAULT_EDIT_STEPS,
    DEFAULT_SAMPLER,
    KEEP_LAYOUT,
    MIXED_PRECISION,
    SAMPLER_NAMES,
    WEIGHT_CONTEXTS,
    WEIGHT_MODES,
)
from diffusion.control.controllers import AttentionRecorder
from diffusion.control.prompts import parse_prompt, set_word_weight, split_words
from diffusion.editor.compiled import CompiledUNet
from diffusion.errors import UserError, exit_on_user_error
from diffusion.images import attention_shares, heat_overlay, save_png, write_attention_maps
from diffusion.sampling.pipeline import Pipeline, PipelineOutput, Weighting, merge_word_maps
from diffusion.sampling.settings import SamplingSettings

DEFAULT_MODEL = "runs/shapes/model"
DEFAULT_PROMPT = "a red circle on the left"
DEFAULT_EDIT = "a blue circle on the left"
WEIGHTED_PROMPT = "a (red:0.5) circle on the left"  # builds the compiled graph that takes weights
MAX_IMAGES = 4
MAX_STEPS = 200
MAX_SEED = 2**63 - 1  # image i takes seed + i, which torch.Generator.manual_seed must take
MAX_PROMPT = 10_000  # characters; the text encoder reads a few dozen tokens of a prompt
SLIDERS = 16  # weight sliders on the page: the prompt's first 16 words get one
MAX_WEIGHT = 4.0
IMAGE_SIDE = 256  # shown size of an image; maps are shown at half of it
# On some CPUs float32 runs the small UNet calls of one image with guidance faster than bf16
# autocast, whose conversions only pay off on larger batches; on others bf16 wins at every size
# (bench/bench_editor.py prints both). So the editor times one call of this many rows in both at
# start-up, and takes float32 for calls up to this size only when it is clearly (10 %) faster.
FLOAT32_MAX_BATCH = 2
FLOAT32_MAX_TIME = 0.9


# ---- the model side -----------------------------------------------------------------------
@dataclass(frozen=True)
class Settings:
    """Everything about a render but the prompt; the page's controls, one field each."""

    weight_mode: str = WEIGHT_MODES[0]
    weight_context: str = WEIGHT_CONTEXTS[0]
    seed: int = 0
    sampler: str = DEFAULT_SAMPLER
    steps: int = 20
    guidance: float = 3.0
    num_images: int = 1

    def check(self) -> None:
        """UserError for what the pipeline does not check itself."""
        if not 1 <= self.num_images <= MAX_IMAGES:
            raise UserError(f"the number of images must be between 1 and {MAX_IMAGES}, got {self.num_images}")
        if not 0 <= self.seed <= MAX_SEED:
            raise UserError(f"the seed must be between 0 and 2**63 - 1, got {self.seed}")

    def unet_batch(self, images: int) -> int:
        """Rows of each UNet call for `images` images: twice as many with classifier-free guidance."""
        return images * (2 if self.guidance != 1 else 1)


@dataclass(frozen=True)
class WordWeight:
    """A word of a prompt (labelled as `split_words` labels it) and the weight the prompt gives it."""

    label: str
    weight: float


def finite(value, name: str) -> float:
    """A control's value as a float. Gradio checks a slider's range but lets NaN and infinity
    through (and a request can send them): UserError naming the control for those."""
    value = float(value)
    if not math.isfinite(value):
        raise UserError(f"{name} must be a finite number, got {value}")
    return value


def settings_of(mode, context, seed, sampler, steps, guidance, images) -> Settings:
    """The page's controls as Settings; UserError for a number that is not finite."""
    return Settings(
        mode,
        context,
        int(finite(seed or 0, "the seed")),
        sampler,
        int(finite(steps, "the number of steps")),
        finite(guidance, "guidance"),
        int(finite(images, "the number of images")),
    )


def map_step(step) -> int:
    """The step slider's value as a step number; UserError for NaN or infinity."""
    return max(0, int(finite(step, "the step of the maps")))


def check_prompt(prompt: str) -> None:
    """UserError for a prompt longer than MAX_PROMPT characters."""
    if len(prompt) > MAX_PROMPT:
        raise UserError(f"a prompt may have at most {MAX_PROMPT} characters, got {len(prompt)}")


def word_weights(prompt: str) -> list[WordWeight]:
    """The words of `prompt`'s plain text with their weights: what the weight sliders show.

    Raises PromptSyntaxError for a malformed prompt."""
    parsed = parse_prompt(prompt)
    return [WordWeight(word.label, parsed.weight_at(word.start, word.end)) for word in split_words(parsed.text)]


def reweight(prompt: str, index: int, weight: float) -> str:
    """`prompt` rewritten with its `index`-th word at `weight`, rounded to two decimals (the sliders
    move in 0.05 steps), so a slider's float noise such as 0.15000000000000002 stays out of the prompt."""
    return set_word_weight(prompt, word_weights(prompt)[index].label, round(float(weight), 2))


@dataclass
class Result:
    """A sampled prompt, kept in the page's session state so that its maps can be drawn again for
    another step without sampling.

    output: what `Pipeline.__call__` returns, with `attention_maps` filled in: per image, word
        label -> (R, R) map averaged over every step (as `attention_maps=True` gives them).
    step_maps: per image, word label -> (steps, R, R): the map of each step; None for a swap
        (`Pipeline.swap` only aggregates).
    seconds: how long sampling took."""

    output: PipelineOutput
    step_maps: list[dict[str, torch.Tensor]] | None
    seconds: float

    @property
    def steps(self) -> int:
        return self.output.settings["steps"]

    def maps(self, index: int, step: int = 0) -> dict[str, torch.Tensor]:
        """Image `index`'s word maps at sampling step `step` (1-based), or over all steps (0)."""
        if step == 0 or self.step_maps is None:
            return self.output.attention_maps[index]
        return {label: maps[step - 1] for label, maps in self.step_maps[index].items()}

    def shares(self) -> dict[str, float]:
        """Each word's share of the attention over all steps, averaged over the images."""
        per_image = [attention_shares(maps) for maps in self.output.attention_maps]
        return {label: sum(shares[label] for shares in per_image) / len(per_image) for label in per_image[0]}


class CachedTextEncoder:
    """A `TextEncoder` that remembers its recent encodings. Every render encodes the prompt, the
    empty prompt of guidance and, for down-weighted words, the prompt without them; moving a
    slider or changing the seed asks for most of these again. The encoder is deterministic, so a
    remembered encoding is the one it would compute."""

    def __init__(self, encoder, size: int = 32):
        self.encoder = encoder
        self.size = size
        self.encodings: OrderedDict[tuple[str, ...], tuple[torch.Tensor, torch.Tensor]] = OrderedDict()

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """`TextEncoder.encode`, from memory when these prompts were encoded recently."""
        key = tuple(prompts)
        if key in self.encodings:
            self.encodings.move_to_end(key)
        else:
            self.encodings[key] = self.encoder.encode(prompts)
            if len(self.encodings) > self.size:
                self.encodings.popitem(last=False)
        embeddings, key_mask = self.encodings[key]
        return embeddings.clone(), key_mask.clone()  # the caller may write into its copy

    def to(self, device) -> CachedTextEncoder:
        self.encoder.to(device)
        return self

    def __getattr__(self, name):  # everything else is the encoder's own
        if name == "encoder":  # not set yet (a copy being made): no endless recursion
            raise AttributeError(name)
        return getattr(self.encoder, name)


class Editor:
    """The model behind the page: one pipeline, loaded once and kept warm, that renders a prompt
    with its per-word maps at every step, and word swaps. Images are those of `Pipeline.__call__`
    and `Pipeline.swap` with the same settings and the precision `precision(batch)` names."""

    def __init__(self, pipeline: Pipeline, model: str, small_batch_precision: str | None = None):
        """pipeline: a loaded pipeline, whose `mixed_precision` UNet calls above FLOAT32_MAX_BATCH
        rows use; model: the model folder, for the PNG metadata; small_batch_precision: the
        setting for calls up to FLOAT32_MAX_BATCH rows (None: the faster one, timed now)."""
        encoder = CachedTextEncoder(pipeline.encoder)
        # One pipeline per precision, sharing the modules, so the precision follows the batch.
        self.pipelines = {
            precision: Pipeline.from_parts(
                pipeline.unet, encoder, pipeline.scheduler_config, pipeline.device, precision
            )
            for precision in {"no", pipeline.mixed_precision}
        }
        self.default_precision = pipeline.mixed_precision
        self.model = model
        self.unet_ms: dict[str, float] = {}  # the start-up timing, per precision
        self.render_ms: dict[str, float] = {}  # the compiled renders' timing, when `compile` chose
        if small_batch_precision is None:
            self.unet_ms = unet_milliseconds(self.pipelines, FLOAT32_MAX_BATCH)
            fast = self.unet_ms["no"] <= FLOAT32_MAX_TIME * self.unet_ms[self.default_precision]
            small_batch_precision = "no" if fast else self.default_precision
        self.small_batch_precision = small_batch_precision

    @classmethod
    def load(cls, model: str | Path, device: str | None = None, mixed_precision: str = "auto") -> Editor:
        """Load the model folder. mixed_precision: "auto" chooses the precision of small batches
        by timing (see FLOAT32_MAX_BATCH) and takes the pipeline's "auto" for larger ones; any
        other setting (no, bf16, fp16) is used for every batch, as in sample.py."""
        pipeline = Pipeline.from_pretrained(model, device=device, mixed_precision=mixed_precision)
        small_batch_precision = None if mixed_precision == "auto" else pipeline.mixed_precision
        return cls(pipeline, str(Path(model).resolve()), small_batch_precision)

    def compile(self) -> float:
        """Compile the UNet for one-image renders (`Pipeline.compile` for UNet calls of 2 rows, one
        image with guidance; its steps past the guidance cutoff run on those graphs too, see
        `CompiledUNet`; other batches and word swaps stay eager) and build its graphs now, with and
        without weights, so that no slider waits for them. Returns the seconds it
        took. Where compiling fails (no C++ compiler, say), the editor stays uncompiled and says
        so in one line.

        Where the precision of small batches is the editor's to choose (it was timed uncompiled),
        both precisions are compiled and renders of each are timed in turn; the faster one keeps its
        graphs. The uncompiled timing does not predict the compiled one: frozen into the graph,
        bf16 weights are cast once, not per call, so a CPU that times the two alike uncompiled can
        render faster in compiled bf16."""
        candidates = sorted(self.unet_ms) if self.unet_ms else [self.small_batch_precision]
        start = time.perf_counter()
        try:
            for precision in candidates:
                self.pipelines[precision].fast_unet = CompiledUNet(
                    self.pipelines[precision].unet, {Settings().unet_batch(1)}
                )  # one image with guidance
            if len(candidates) > 1:
                self.render_ms = self.render_milliseconds(candidates)
                self.small_batch_precision = min(self.render_ms, key=self.render_ms.get)
                self.unet_ms = {}
                for precision in candidates:
                    if precision != self.small_batch_precision:
                        self.pipelines[precision].fast_unet = None
            for prompt in (DEFAULT_PROMPT, WEIGHTED_PROMPT):
                self.render(prompt, Settings())
        except Exception as error:  # inductor's failures share no type; the eager UNet still works
            for precision in candidates:
                self.pipelines[precision].fast_unet = None
            print(f"warning: torch.compile failed ({str(error).strip().splitlines()[0]}); renders stay uncompiled")
        return time.perf_counter() - start

    def render_milliseconds(self, precisions: list[str], repeats: int = 3) -> dict[str, float]:
        """Median milliseconds of a one-image render of the default prompt in each of `precisions`,
        taking turns (see `unet_milliseconds`); a first render each, which compiles, is not counted."""
        chosen = self.small_batch_precision
        times = {precision: [] for precision in precisions}
        try:
            for _ in range(repeats + 1):
                for precision in precisions:
                    self.small_batch_precision = precision
                    times[precision].append(self.render(DEFAULT_PROMPT, Settings()).seconds)
        finally:
            self.small_batch_precision = chosen
        return {precision: statistics.median(seconds[1:]) * 1000 for precision, seconds in times.items()}

    @property
    def compiled(self) -> bool:
        """Whether one-image renders run on the compiled UNet."""
        return self.pipelines[self.small_batch_precision].fast_unet is not None

    def warm_up(self) -> Result:
        """Render the default prompt twice and return the second render. The first call builds
        the oneDNN kernels, so it is many times slower than the ones after it; a user's first
        render should not pay for that."""
        self.render(DEFAULT_PROMPT, Settings())
        return self.render(DEFAULT_PROMPT, Settings())

    @property
    def pipeline(self) -> Pipeline:
        return self.pipelines[self.default_precision]

    def precision(self, batch: int) -> str:
        """The mixed-precision setting for UNet calls of `batch` rows."""
        return self.small_batch_precision if batch <= FLOAT32_MAX_BATCH else self.default_precision

    def precision_note(self) -> str:
        """One line on the precisions chosen, with the start-up timing behind the choice."""
        name = precision_name
        timing = ", ".join(f"{name(p)} {ms:.1f} ms" for p, ms in self.unet_ms.items())
        timing = f" (a call of {FLOAT32_MAX_BATCH} rows: {timing})" if timing else ""
        compiled = ", compiled for one image with guidance" if self.compiled else ""
        if self.compiled and self.render_ms:
            compiled += " (a render: " + ", ".join(f"{name(p)} {ms:.0f} ms" for p, ms in self.render_ms.items()) + ")"
        if self.small_batch_precision == self.default_precision:
            return f"{name(self.default_precision)} for every UNet call{timing}{compiled}"
        return (
            f"{name(self.small_batch_precision)} for UNet calls of up to {FLOAT32_MAX_BATCH} rows{timing}, "
            f"{name(self.default_precision)} above{compiled}"
        )

    def render(self, prompt: str, settings: Settings) -> Result:
        """Sample `prompt` (weighting syntax allowed) and record each word's map at every step.

        Raises UserError (PromptSyntaxError for a malformed prompt) before any sampling."""
        settings.check()
        check_prompt(prompt)
        text = parse_prompt(prompt).text
        pipeline = self.pipelines[self.precision(settings.unet_batch(settings.num_images))]
        recorder = AttentionRecorder(pipeline.unet.config.sample_size, keep_history=True)
        start = time.perf_counter()
        output = pipeline(
            prompt,
            num_images_per_prompt=settings.num_images,
            seed=settings.seed,
            steps=settings.steps,
            guidance=settings.guidance,
            sampler=settings.sampler,
            weighting=Weighting(settings.weight_mode, context=settings.weight_context),
            attention_controller=recorder,
            batch_size=MAX_IMAGES,
            progress=False,
        )
        offsets = self.offsets(text)
        # The recorder is the pipeline's own kind, so these are the maps attention_maps=True gives.
        maps = [merge_word_maps(token_maps, text, offsets) for token_maps in recorder.token_maps().cpu()]
        calls_per_step = recorder.calls / len(recorder.history)
        history = torch.stack([recorder.history[step] for step in sorted(recorder.history)], dim=2)  # (B, T, S, R, R)
        history = history.cpu() / calls_per_step
        step_maps = [merge_word_maps(token_maps, text, offsets) for token_maps in history]
        return Result(replace(output, attention_maps=maps), step_maps, time.perf_counter() - start)

    def swap(
        self, source: str, edit: str, edit_steps: float, settings: Settings, keep_layout: bool | None = None
    ) -> tuple[Result, Result]:
        """Prompt-to-Prompt word swap (`Pipeline.swap`): `edit` drawn from `source`'s noise with
        its maps injected for the first `edit_steps` fraction of the steps (the other words' at
        every step with keep_layout; None: auto, by the kind of swap, as `Pipeline.swap`). Returns
        (source, edit)."""
        settings.check()
        check_prompt(source)
        check_prompt(edit)
        pipeline = self.pipelines[self.precision(settings.unet_batch(2))]  # one (source, edit) pair per batch
        start = time.perf_counter()
        sampling = SamplingSettings(
            steps=settings.steps,
            guidance=settings.guidance,
            sampler=settings.sampler,
            weighting=Weighting(settings.weight_mode, context=settings.weight_context),
            edit_steps=edit_steps,
            keep_layout=keep_layout,
        )
        outputs = pipeline.swap(
            source,
            edit,
            sampling,
            num_images=settings.num_images,
            seed=settings.seed,
            attention_maps=True,
            progress=False,
        )
        seconds = time.perf_counter() - start
        return Result(outputs[0], None, seconds), Result(outputs[1], None, seconds)

    def offsets(self, text: str) -> torch.Tensor:
        """The tokens' character offsets (T, 2) in a plain prompt, without the truncation warning
        (the pipeline gives it)."""
        return self.pipeline.encoder.offsets([text])[0]


@dataclass
class View:
    """What the word-weights tab shows after a request: a result, and the error above it."""

    result: Result
    error: str = ""  # `error_html` of what went wrong; "" when the request went through


def update(editor: Editor, prompt: str, settings: Settings, last: Result) -> View:
    """Render `prompt` (submitted, or Render pressed). A bad prompt or setting keeps `last` on
    screen, with the message above it."""
    try:
        return View(editor.render(prompt, settings))
    except UserError as error:
        return View(last, error_html(error))


def update_weight(
    editor: Editor, prompt: str, index: int, weight: float, settings: Settings, last: Result
) -> tuple[str, View]:
    """A weight slider was released: rewrite `prompt` with its `index`-th word at `weight`, then
    `update`. Returns the prompt (unchanged when it is malformed) and the view."""
    try:
        prompt = reweight(prompt, index, weight)
    except UserError as error:
        return prompt, View(last, error_html(error))
    return prompt, update(editor, prompt, settings, last)


def precision_name(mixed_precision: str) -> str:
    """A mixed-precision setting as people say it: "no" is float32."""
    return "float32" if mixed_precision == "no" else mixed_precision


def unet_milliseconds(pipelines: dict[str, Pipeline], batch: int, repeats: int = 5) -> dict[str, float]:
    """Median milliseconds of one UNet call of `batch` rows (noise, 40 context tokens) in each
    pipeline's precision, keyed as `pipelines`. The pipelines take turns, so a busy neighbour on
    the CPU slows them alike; two calls each first build the kernels."""
    unet = next(iter(pipelines.values())).unet
    device, size = unet.device, unet.config.sample_size
    x = torch.randn(batch, 3, size, size, device=device)
    context = torch.randn(batch, 40, unet.config.context_dim, device=device)
    times = {key: [] for key in pipelines}
    with torch.no_grad():
        for _ in range(repeats + 2):
            for key, pipeline in pipelines.items():
                with pipeline.autocast():
                    start = time.perf_counter()
                    pipeline.unet(x, 500, context).sum().item()  # .item(): wait for a GPU to finish
                    times[key].append(time.perf_counter() - start)
    return {key: statistics.median(seconds[2:]) * 1000 for key, seconds in times.items()}


# ---- downloads and views (plain Python and HTML) ----------------------------------------------
def write_downloads(results: dict[str, Result], folder: Path, model: str) -> list[Path]:
    """For each result (named by its key) and each of its images: the image as a PNG with its
    prompt and settings in the text metadata, as sample.py writes it, and its attention panel and
    raw per-word maps (safetensors), as sample.py's --attention writes them."""
    written = []
    for name, result in results.items():
        output = result.output
        settings = {**output.settings, "model": model}
        for i, (image, prompt, seed) in enumerate(zip(output.images, output.prompts, output.seeds)):
            metadata = {"prompt": prompt, "seed": seed, **settings}
            written.append(save_png(image, folder / f"{name}-{i:03d}.png", metadata))
        write_attention_maps(folder, f"{name}-maps", output, settings)
        written += sorted(folder.glob(f"{name}-maps-*"))
    return written


def _figure(css_class: str, image: Image.Image, side: int, caption: str) -> str:
    """`image` as an inline PNG at its own size, shown about `side` pixels wide, with its caption.
    The browser scales it up nearest-neighbour (CSS `image-rendering: pixelated`), so a 32-px
    image stays crisp and the PNG stays small and quick to encode."""
    scale = max(1, side // max(image.size))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    source = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    return (
        f'<figure class="{css_class}"><img src="{source}" width="{image.width * scale}" '
        f'height="{image.height * scale}" alt="{html.escape(caption)}"><figcaption>{caption}</figcaption></figure>'
    )


def _image_with_maps(result: Result, index: int, step: int, side: int) -> str:
    """One image and, beside it, the heat-map overlay of each word with its share of the attention."""
    image = result.output.images[index]
    maps = result.maps(index, step)
    shares = attention_shares(maps)
    tiles = "".join(
        _figure(
            "word-map", heat_overlay(image, word_map), side // 2, f"{html.escape(label)} <b>{shares[label]:.0%}</b>"
        )
        for label, word_map in maps.items()
    )
    seed = result.output.seeds[index]
    return (
        f'<div class="result-row">{_figure("result-image", image, side, f"seed {seed}")}'
        f'<div class="word-maps">{tiles}</div></div>'
    )


def result_html(result: Result, step: int = 0) -> str:
    """The rendered images, each with one heat-map overlay per word, at sampling step `step`
    (1-based) or averaged over all steps (0)."""
    when = f"step {step} of {result.steps}" if step else f"all {result.steps} steps"
    settings = result.output.settings
    header = (
        f"<p class='result-caption'>maps over {when} &middot; {settings['sampler']}, guidance "
        f"{settings['guidance']:g}, {precision_name(settings['mixed_precision'])} &middot; "
        f"{result.seconds * 1000:.0f} ms</p>"
    )
    rows = "".join(_image_with_maps(result, i, step, IMAGE_SIDE) for i in range(len(result.output.images)))
    prompt = html.escape(result.output.prompts[0], quote=True)
    return f'<div class="result" data-prompt="{prompt}" data-step="{step}">{header}{rows}</div>'


def swap_html(source: Result, edit: Result) -> str:
    """Source and edit images side by side, one pair per row, each with its prompt's word maps."""
    side = IMAGE_SIDE * 3 // 4
    rows = []
    for i in range(len(source.output.images)):
        panels = "".join(
            f'<div class="swap-panel"><p class="swap-prompt">{name}: '
            f"{html.escape(result.output.prompts[i])}</p>{_image_with_maps(result, i, 0, side)}</div>"
            for name, result in (("source", source), ("edit", edit))
        )
        rows.append(f'<div class="swap-row">{panels}</div>')
    return f'<div class="swap-result">{"".join(rows)}</div>'


def slider_states(words: list[WordWeight], result: Result | None) -> list[dict]:
    """The state of each of the SLIDERS weight sliders (Slider keyword arguments): shown, labelled
    and set for one of `words`, with the word's share of the attention in `result` when that is
    a render of the same words; or hidden."""
    rendered = result is not None and [w.label for w in word_weights(result.output.prompts[0])] == [
        w.label for w in words
    ]
    shares = result.shares() if rendered else {}
    states = []
    for i in range(SLIDERS):
        if i >= len(words):
            states.append({"visible": False})
            continue
        word = words[i]
        if word.label in shares:
            info = f"{shares[word.label]:.0%} of the attention"
        else:
            info = "cut off: past the token limit" if rendered else "not rendered yet (press Enter)"
        states.append(
            {
                "visible": True,
                "label": word.label,
                "value": word.weight,
                "info": info,
                "maximum": max(MAX_WEIGHT, word.weight),
            }
        )
    return states


def error_html(error: UserError) -> str:
    """A UserError's message in monospace, so the caret under a malformed prompt stays aligned."""
    return f'<pre class="prompt-error">{html.escape(str(error))}</pre>'


# ---- the page ---------------------------------------------------------------------------------
CSS = """
.result-row, .swap-row { display: flex; gap: 16px; align-items: flex-start; margin-bottom: 12px; }
.word-maps { display: flex; flex-wrap: wrap; gap: 8px; }
.result figure, .swap-result figure { margin: 0; text-align: center; flex: none; }
.result img, .swap-result img { image-rendering: pixelated; display: block; max-width: none; border-radius: 4px; }
.result figcaption, .swap-result figcaption { font-size: 13px; margin-top: 2px; }
.result-caption, .swap-prompt { font-size: 13px; color: var(--body-text-color-subdued); margin: 0 0 6px; }
.swap-panel { flex: 1 1 0; min-width: 0; }
.swap-panel .result-row { flex-direction: column; }
.prompt-error { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 14px;
                color: #b91c1c; background: #fef2f2; border: 1px solid #fecaca; border-radius: 6px;
                padding: 8px 12px; margin: 0; white-space: pre; overflow-x: auto; }
"""


class DownloadFolders:
    """A fresh folder for each result's files under one temporary folder. Gradio copies the files
    a handler returns into its own cache at once, so only the newest few folders are kept (a few:
    the handlers of several tabs may be writing at the same time)."""

    def __init__(self, keep: int = 8):
        self.temporary = tempfile.TemporaryDirectory(prefix="attention-editor-")  # removed at exit
        self.root = Path(self.temporary.name)
        self.keep = keep
        self.numbers = itertools.count(1)  # next() on it is atomic: handlers run in several threads

    def next(self) -> Path:
        """A new empty folder; the oldest ones go."""
        folder = self.root / f"{next(self.numbers):06d}"
        folder.mkdir()
        for old in sorted(self.root.iterdir())[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return folder


def build_page(editor: Editor, first: Result):
    """The Gradio page around `editor`; `first` is the warm-up render it opens with."""
    import gradio as gr

    folders = DownloadFolders()

    def slider_updates(prompt: str, result: Result | None) -> list:
        """`slider_states` as Gradio updates, then the note on words without a slider."""
        words = word_weights(prompt)
        more = len(words) > SLIDERS
        note = f"Only the first {SLIDERS} words have sliders; weight the others in the prompt: `(word:1.5)`."
        return [gr.update(**state) for state in slider_states(words, result)] + [
            gr.update(visible=more, value=note if more else "")
        ]

    def show(prompt: str, view: View, step: int) -> list:
        if view.error:  # the last good result stays on screen as it is
            return [gr.update(value=view.error, visible=True)] + [gr.skip()] * (3 + SLIDERS + 1)
        step = min(step, view.result.steps)
        return [
            gr.update(value="", visible=False),
            result_html(view.result, step),
            gr.update(maximum=view.result.steps, value=step),
            view.result,
            *slider_updates(prompt, view.result),
        ]

    def on_downloads(result: Result) -> list[str]:
        return [str(f) for f in write_downloads({"image": result}, folders.next(), editor.model)]

    def on_render(prompt, step, last, *controls):
        try:
            settings, step = settings_of(*controls), map_step(step)
        except UserError as error:
            return show(prompt, View(last, error_html(error)), 0)
        return show(prompt, update(editor, prompt, settings, last), step)

    def on_weight(index, prompt, weight, step, last, *controls):
        try:
            settings, step = settings_of(*controls), map_step(step)
        except UserError as error:
            return [prompt] + show(prompt, View(last, error_html(error)), 0)
        prompt, view = update_weight(editor, prompt, index, weight, settings, last)
        return [prompt] + show(prompt, view, step)

    def on_typed(prompt, last):
        try:
            return slider_updates(prompt, last)
        except UserError:  # half-typed brackets: shown as an error only when rendered
            return [gr.skip()] * (SLIDERS + 1)

    def on_step(step, last):
        try:
            return result_html(last, min(map_step(step), last.steps))
        except UserError:
            return gr.skip()

    def on_swap(source, edit, edit_steps, keep_layout, *controls):
        try:
            settings = settings_of(*controls)
            results = editor.swap(source, edit, float(edit_steps), settings, KEEP_LAYOUT[keep_layout])
        except UserError as error:
            return gr.update(value=error_html(error), visible=True), gr.skip(), gr.skip()
        files = write_downloads(dict(zip(("source", "edit"), results)), folders.next(), editor.model)
        return gr.update(value="", visible=False), swap_html(*results), [str(f) for f in files]

    with gr.Blocks(title="Attention editor", analytics_enabled=False, delete_cache=(600, 3600)) as page:
        gr.Markdown(f"## Attention editor &middot; `{html.escape(editor.model)}`")
        with gr.Accordion("Sampling settings", open=True):
            with gr.Row():
                mode = gr.Radio(
                    list(WEIGHT_MODES),
                    value=WEIGHT_MODES[0],
                    label="Weight mode",
                    info="scale the word's cross-attention or its text embedding",
                )
                context = gr.Radio(
                    list(WEIGHT_CONTEXTS),
                    value=WEIGHT_CONTEXTS[0],
                    label="Context",
                    info="fade: a down-weighted word also fades from the other words",
                )
                seed = gr.Number(0, label="Seed", precision=0, minimum=0)
                sampler = gr.Dropdown(list(SAMPLER_NAMES), value=DEFAULT_SAMPLER, label="Sampler")
            with gr.Row():
                steps = gr.Slider(1, MAX_STEPS, value=20, step=1, label="Steps")
                guidance = gr.Slider(1, 10, value=3, step=0.5, label="Guidance", info="1 = off")
                images = gr.Slider(1, MAX_IMAGES, value=1, step=1, label="Images")
        controls = [mode, context, seed, sampler, steps, guidance, images]
        last_result = gr.State(first)  # per browser tab: what the step slider redraws

        with gr.Tabs():
            with gr.Tab("Word weights", id="weights"):
                error = gr.HTML("", visible=False, elem_id="error")  # full width: the caret line must not wrap
                with gr.Row():
                    with gr.Column(scale=2, min_width=320):
                        prompt = gr.Textbox(
                            DEFAULT_PROMPT,
                            label="Prompt",
                            elem_id="prompt",
                            max_lines=1,
                            info="Enter renders; weights as (red:1.5), (red), [red]",
                        )
                        render = gr.Button("Render", variant="primary")
                        gr.Markdown("**Word weights** (1 = unchanged; release a slider to render)")
                        with gr.Row():  # two sliders a row where they fit
                            sliders = [
                                gr.Slider(
                                    **{
                                        "minimum": 0,
                                        "maximum": MAX_WEIGHT,
                                        "value": 1,
                                        "step": 0.05,
                                        "min_width": 200,
                                        "elem_classes": "word-weight",
                                        **shown,
                                    }
                                )
                                for shown in slider_states(word_weights(DEFAULT_PROMPT), first)
                            ]
                        more_words = gr.Markdown("", visible=False)
                    with gr.Column(scale=3):
                        step = gr.Slider(
                            0,
                            first.steps,
                            value=0,
                            step=1,
                            label="Step of the maps",
                            info="0 = averaged over all steps",
                            elem_id="step",
                        )
                        maps = gr.HTML(result_html(first), elem_id="maps")
                        downloads = gr.File(
                            on_downloads(first),
                            label="Downloads: images (PNG with prompt and "
                            "settings), attention panels and raw maps (safetensors)",
                            file_count="multiple",
                            interactive=False,
                            elem_id="downloads",
                        )
            with gr.Tab("Word swap", id="swap"):
                with gr.Row():
                    source = gr.Textbox(DEFAULT_PROMPT, label="Source prompt", elem_id="source", max_lines=1)
                    edit = gr.Textbox(DEFAULT_EDIT, label="Edited prompt", elem_id="edit", max_lines=1)
                with gr.Row():
                    edit_steps = gr.Slider(
                        0,
                        1,
                        value=DEFAULT_EDIT_STEPS,
                        step=0.05,
                        label="Edit steps",
                        info="fraction of the steps that keep the source's maps",
                    )
                    keep_layout = gr.Radio(
                        list(KEEP_LAYOUT),
                        value="auto",
                        label="Keep layout",
                        info="the other words keep the source's maps at every step (auto: for colour and size swaps)",
                        elem_id="keep-layout",
                    )
                    swap = gr.Button("Swap", variant="primary", elem_id="swap-button")
                swap_error = gr.HTML("", visible=False, elem_id="swap-error")
                swap_view = gr.HTML("", elem_id="swap-view")
                swap_downloads = gr.File(label="Downloads", file_count="multiple", interactive=False)

        # The files are written after the page shows the result, not before (they take a few ms).
        # Cheap handlers run outside the queue, so they never wait behind a render.
        outputs = [error, maps, step, last_result, *sliders, more_words]
        for event in (prompt.submit, render.click):
            event(on_render, [prompt, step, last_result, *controls], outputs).then(
                on_downloads, last_result, downloads, queue=False, show_progress="hidden"
            )
        for index, slider in enumerate(sliders):
            slider.release(
                lambda *args, index=index: on_weight(index, *args),
                [prompt, slider, step, last_result, *controls],
                [prompt, *outputs],
            ).then(on_downloads, last_result, downloads, queue=False, show_progress="hidden")
        prompt.input(on_typed, [prompt, last_result], [*sliders, more_words], queue=False, show_progress="hidden")
        step.release(on_step, [step, last_result], maps, queue=False, show_progress="hidden")
        swap.click(on_swap, [source, edit, edit_steps, keep_layout, *controls], [swap_error, swap_view, swap_downloads])
    return page.queue(default_concurrency_limit=1)


@exit_on_user_error
def main(argv=None):
    parser = ArgumentParser(description="A live attention editor for a trained model, in the browser.")
    parser.add_argument("--model", help=f"model folder written by train.py (default: {DEFAULT_MODEL})")
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)"
    )
    parser.add_argument("--port", type=int, default=7860, help="port to listen on (default 7860)")
    parser.add_argument("--device", default=None, help="cpu, cuda, mps (default: the best available)")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for torch (default: torch's, one per core). Beside a training run, 1 "
        "keeps the two from spinning against each other, which slows a render several times",
    )
    parser.add_argument(
        "--mixed-precision",
        default="auto",
        choices=MIXED_PRECISION,
        help="autocast of the UNet (default auto: for one image with guidance, float32 where a "
        "start-up timing finds it clearly faster; else bf16 where the device does it natively)",
    )
    parser.add_argument(
        "--sessions",
        type=int,
        default=32,
        help="browser tabs whose last render the server keeps for the step slider (default 32); "
        "older ones are forgotten, so memory stays bounded however many tabs come and go",
    )
    parser.add_argument(
        "--no-compile",
        action="store_true",
        help="skip torch.compile of the UNet for one-image renders: the page is ready in seconds "
        "instead of a minute or more, and a render takes longer (about 1.7x on a 2-core CPU)",
    )
    args = parser.parse_args(argv)
    one_line_warnings()
    if not 1 <= args.port <= 65535:
        raise UserError(f"--port must be between 1 and 65535, got {args.port}")
    cores = os.cpu_count() or 1
    if args.threads is not None and not 1 <= args.threads <= cores:  # more threads than cores only slow torch
        raise UserError(f"--threads must be between 1 and this machine's {cores} CPU cores, got {args.threads}")
    if args.sessions < 1:
        raise UserError(f"--sessions must be 1 or more, got {args.sessions}")
    check_device(args.device)
    if args.model is None and not Path(DEFAULT_MODEL).is_dir():
        raise UserError(f"no model at {DEFAULT_MODEL}; train one with `python train.py` or pass --model")
    try:
        import gradio  # noqa: F401  (optional: the app extra)
    except ImportError:
        raise UserError('the editor needs Gradio: pip install -e ".[app]"') from None

    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    editor = Editor.load(args.model or DEFAULT_MODEL, device=args.device, mixed_precision=args.mixed_precision)
    if not args.no_compile:
        print(
            "compiling the UNet for one-image renders, and timing it in each precision "
            "(a minute or more on 2 CPU cores; --no-compile skips it)"
        )
        print(f"compiled in {editor.compile():.0f} s", flush=True)
    print(f"precision: {editor.precision_note()}", flush=True)
    first = editor.warm_up()
    page = build_page(editor, first)
    try:
        page.launch(
            server_name=args.host,
            server_port=args.port,
            ssr_mode=False,
            quiet=True,
            prevent_thread_lock=True,
            css=CSS,
            state_session_capacity=args.sessions,  # Gradio's default, 10,000 tabs, grows without bound
        )
    except OSError as error:
        raise UserError(f"cannot listen on {args.host}:{args.port}: {str(error).splitlines()[0]}") from None
    print(
        f"ready {time.perf_counter() - start:.1f} s after loading began (a render takes "
        f"{first.seconds * 1000:.0f} ms): http://{args.host}:{args.port}",
        flush=True,
    )
    page.block_thread()


if __name__ == "__main__":
    tune_malloc()  # PyTorch on CPU: faster steps (diffusion/cli.py)
    main()
