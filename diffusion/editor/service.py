"""The editor's model side (app.py is its page): one pipeline loaded once and kept warm, that
renders a prompt with each word's map at every sampling step, and word swaps.

    editor = Editor.load("runs/shapes/model")
    result = editor.render("a (red:0.5) circle", Settings(seed=3))
    editor.compile_in_background()       # renders switch to the compiled UNet when it is ready

No Gradio here: bench/bench_editor.py and tests/test_app.py call it directly. The UNet is compiled
for one-image renders (diffusion/editor/compiled.py: a slider's render 1.7x faster on a 2-core CPU,
images within a level or two of the uncompiled ones) in a background thread, so the page is served
at once and its renders run uncompiled until the compiled graphs are built and warm
(`Editor.compile`).
"""

from __future__ import annotations

import copy
import itertools
import math
import shutil
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from diffusion.config import DEFAULT_SAMPLER, WEIGHT_CONTEXTS, WEIGHT_MODES
from diffusion.control.controllers import AttentionRecorder
from diffusion.control.prompts import parse_prompt, set_word_weight, split_words
from diffusion.control.weighting import Weighting
from diffusion.editor.compiled import CompiledUNet, not_compiled_because
from diffusion.errors import UserError
from diffusion.images import attention_shares, save_png, write_attention_maps
from diffusion.sampling.pipeline import Pipeline, PipelineOutput, merge_word_maps
from diffusion.sampling.settings import SamplingSettings
from diffusion.sampling.stock import load_pipeline

DEFAULT_PROMPT = "a red circle on the left"
DEFAULT_EDIT = "a blue circle on the left"
WEIGHTED_PROMPT = "a (red:0.5) circle on the left"  # builds the compiled graph that takes weights
MAX_IMAGES = 4
MAX_STEPS = 200
MAX_SEED = 2**63 - 1  # image i takes seed + i, which torch.Generator.manual_seed must take
MAX_PROMPT = 10_000  # characters; the text encoder reads a few dozen tokens of a prompt
ENCODINGS = 32  # prompts' text states the encoder remembers: a slider or a new seed asks for most again
# On some CPUs float32 runs the small UNet calls of one image with guidance faster than bf16
# autocast, whose conversions only pay off on larger batches; on others bf16 wins at every size
# (bench/bench_editor.py prints both). So the editor times one call of this many rows in both at
# start-up, and takes float32 for calls up to this size only when it is clearly (10 %) faster.
FLOAT32_MAX_BATCH = 2
FLOAT32_MAX_TIME = 0.9


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

    def sampling(self, **changes) -> SamplingSettings:
        """The pipeline's settings of a render with these controls (the others at their defaults);
        `changes`: other fields of `SamplingSettings`, e.g. a swap's edit_steps."""
        weighting = Weighting(self.weight_mode, context=self.weight_context)
        return SamplingSettings(
            steps=self.steps, guidance=self.guidance, sampler=self.sampler, weighting=weighting, **changes
        )


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


class Editor:
    """The model behind the page: one pipeline, loaded once and kept warm, that renders a prompt
    with its per-word maps at every step, and word swaps. Images are those of `Pipeline.__call__`
    and `Pipeline.swap` with the same settings and the precision `precision(batch)` names."""

    def __init__(self, pipeline: Pipeline, model: str, small_batch_precision: str | None = None):
        """pipeline: a loaded pipeline, whose `mixed_precision` UNet calls above FLOAT32_MAX_BATCH
        rows use; model: the model folder, for the PNG metadata; small_batch_precision: the
        setting for calls up to FLOAT32_MAX_BATCH rows (None: the faster one, timed now)."""
        pipeline.encoder.remember(ENCODINGS)
        # One pipeline per precision, sharing the modules, so the precision follows the batch.
        self.pipelines = {
            precision: self._sharing(pipeline, precision) for precision in {"no", pipeline.mixed_precision}
        }
        self.default_precision = pipeline.mixed_precision
        self.model = model
        self.unet_ms: dict[str, float] = {}  # the start-up timing, per precision
        self.render_ms: dict[str, float] = {}  # the compiled renders' timing, when `compile` chose
        self.compiling = False  # a `compile_in_background` is under way
        self.compile_error: str | None = None  # the first line of why compiling failed
        self.not_compiled = not_compiled_because(pipeline.unet)  # why this UNet renders eager (None: it compiles)
        if small_batch_precision is None:
            self.unet_ms = unet_milliseconds(self.pipelines, FLOAT32_MAX_BATCH)
            fast = self.unet_ms["no"] <= FLOAT32_MAX_TIME * self.unet_ms[self.default_precision]
            small_batch_precision = "no" if fast else self.default_precision
        self.small_batch_precision = small_batch_precision

    @classmethod
    def load(cls, model: str | Path, device: str | None = None, mixed_precision: str = "auto") -> Editor:
        """Load the model folder (this project's, or a diffusers Stable Diffusion / SDXL one:
        `load_pipeline`). mixed_precision: "auto" chooses the precision of small batches by timing
        (see FLOAT32_MAX_BATCH; this project's UNet only) and takes the pipeline's "auto" for
        larger ones; any other setting (no, bf16, fp16) is used for every batch, as in sample.py."""
        pipeline = load_pipeline(model, device=device, mixed_precision=mixed_precision)
        timed = mixed_precision == "auto" and isinstance(pipeline, Pipeline)
        small_batch_precision = None if timed else pipeline.mixed_precision
        return cls(pipeline, str(Path(model).resolve()), small_batch_precision)

    @staticmethod
    def _sharing(pipeline: Pipeline, precision: str) -> Pipeline:
        """A pipeline of `pipeline`'s modules (none copied) that runs the UNet in `precision`."""
        return pipeline.with_precision(precision)

    @property
    def compilable(self) -> bool:
        """Whether `compile` can work: `CompiledUNet` compiles this project's UNet, not a diffusers one."""
        return self.not_compiled is None

    def compile(self) -> float:
        """Compile the UNet for one-image renders (`CompiledUNet` for UNet calls of 2 rows, one
        image with guidance; its steps past the guidance cutoff run on those graphs too; other
        batches and word swaps stay eager) and build its graphs, with and without weights, so that
        no slider waits for them. Returns the seconds it took. Where compiling fails (no C++
        compiler, say), the editor stays uncompiled and says so in one line (`compile_error`).

        The graphs are built and warmed on pipelines of the editor's own: renders meanwhile (from
        another thread, `compile_in_background`) run uncompiled, and switch with one assignment
        when the graphs are ready, so a render runs wholly on one UNet or the other.

        Where the precision of small batches is the editor's to choose (it was timed uncompiled),
        both precisions are compiled and renders of each are timed in turn; the faster one is kept.
        The uncompiled timing does not predict the compiled one: frozen into the graph, bf16
        weights are cast once, not per call, so a CPU that times the two alike uncompiled can
        render faster in compiled bf16."""
        if self.not_compiled:
            print(f"note: {self.not_compiled}; renders stay uncompiled", flush=True)
            return 0.0
        candidates = sorted(self.unet_ms) if self.unet_ms else [self.small_batch_precision]
        start = time.perf_counter()
        try:
            # copies of the editor's pipelines (modules shared, not moved), to carry the compiled UNet
            compiled = {precision: copy.copy(self.pipelines[precision]) for precision in candidates}
            for pipeline in compiled.values():
                pipeline.fast_unet = CompiledUNet(pipeline.unet, {Settings().unet_batch(1)})  # one image, guided
            chosen, render_ms = self.small_batch_precision, {}
            if len(candidates) > 1:
                render_ms = self.render_milliseconds(compiled)
                chosen = min(render_ms, key=render_ms.get)
            for prompt in (DEFAULT_PROMPT, WEIGHTED_PROMPT):
                self._render(compiled[chosen], prompt, Settings())
        except Exception as error:  # inductor's failures share no type; the eager UNet still works
            self.compile_error = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            print(f"warning: torch.compile failed ({self.compile_error}); renders stay uncompiled", flush=True)
            return time.perf_counter() - start
        # The switch: the compiled UNet first, then the precision that takes it, so a render that
        # reads the two in between runs uncompiled in the precision it had.
        self.pipelines[chosen].fast_unet = compiled[chosen].fast_unet
        if render_ms:
            self.render_ms, self.unet_ms = render_ms, {}
        self.small_batch_precision = chosen
        return time.perf_counter() - start

    def compile_in_background(self) -> threading.Thread:
        """`compile` in a thread of its own, started now; `status` says how far it is. The page is
        served meanwhile: compiling takes a minute or more on a 2-core CPU."""

        def run():
            try:
                seconds = self.compile()
                if self.compiled:
                    print(
                        f"compiled in {seconds:.0f} s; {self.status()}; precision: {self.precision_note()}", flush=True
                    )
            finally:
                self.compiling = False

        self.compiling = True
        thread = threading.Thread(target=run, name="compile-unet", daemon=True)  # a quit does not wait for it
        thread.start()
        return thread

    def render_milliseconds(self, pipelines: dict[str, Pipeline], repeats: int = 3) -> dict[str, float]:
        """Median milliseconds of a one-image render of the default prompt on each of `pipelines`
        (keyed by precision), taking turns (see `unet_milliseconds`); a first render each, which
        compiles, is not counted."""
        times = {precision: [] for precision in pipelines}
        for _ in range(repeats + 1):
            for precision, pipeline in pipelines.items():
                times[precision].append(self._render(pipeline, DEFAULT_PROMPT, Settings()).seconds)
        return {precision: statistics.median(seconds[1:]) * 1000 for precision, seconds in times.items()}

    @property
    def compiled(self) -> bool:
        """Whether one-image renders run on the compiled UNet."""
        return getattr(self.pipelines[self.small_batch_precision], "fast_unet", None) is not None  # stock: none

    def status(self) -> str:
        """One line for the page: which UNet one-image renders run on now."""
        if self.compiled:
            return f"renders: compiled, {precision_name(self.small_batch_precision)}"
        if self.compiling:
            return "renders: uncompiled (compiling in the background…)"
        if self.compile_error:
            return f"renders: uncompiled (torch.compile failed: {self.compile_error})"
        if self.not_compiled:
            return f"renders: uncompiled ({self.not_compiled})"
        return "renders: uncompiled"

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
        return self._render(self.pipelines[self.precision(settings.unet_batch(settings.num_images))], prompt, settings)

    def _render(self, pipeline: Pipeline, prompt: str, settings: Settings) -> Result:
        """`render` on `pipeline`."""
        settings.check()
        check_prompt(prompt)
        text = parse_prompt(prompt).text
        recorder = AttentionRecorder(pipeline.map_size, keep_history=True)
        start = time.perf_counter()
        output = pipeline(
            prompt,
            num_images_per_prompt=settings.num_images,
            seed=settings.seed,
            attention_controller=recorder,
            batch_size=MAX_IMAGES,
            progress=False,
            settings=settings.sampling(),
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
        outputs = pipeline.swap(
            source,
            edit,
            settings.sampling(edit_steps=edit_steps, keep_layout=keep_layout),
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
