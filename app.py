"""A live attention editor in the browser: weight each word of a prompt with a slider, see what
every word attends to at each sampling step, and swap words with Prompt-to-Prompt.

    pip install -e ".[app]"
    python app.py --model runs/shapes/model [--port 7860] [--host 127.0.0.1] [--threads 1] [--no-compile]

--model also takes a local diffusers Stable Diffusion or SDXL folder (diffusion/sampling/stock.py);
its renders run uncompiled.

This file is the Gradio page and its command line. The model side (`Editor`, `Settings`,
`Result`) is diffusion/editor/service.py, the HTML it shows diffusion/editor/views.py; neither
needs Gradio. The model and its text encoder are loaded once at start-up and kept warm; the page
is served at once, and the UNet is compiled for one-image renders in the background, renders
switching to it when it is ready (the page's status line says which runs). Requests from several
browser tabs queue and run one at a time (the CPU has no room for two samplers at once).
"""

from __future__ import annotations

import argparse
import html
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from diffusion.cli import ArgumentParser, add_model_options, check_device, one_line_warnings, tune_malloc
from diffusion.config import (
    DEFAULT_EDIT_STEPS,
    DEFAULT_SAMPLER,
    KEEP_LAYOUT,
    SAMPLER_NAMES,
    WEIGHT_CONTEXTS,
    WEIGHT_MODES,
)
from diffusion.editor.service import (
    DEFAULT_EDIT,
    DEFAULT_PROMPT,
    MAX_IMAGES,
    MAX_STEPS,
    DownloadFolders,
    Editor,
    Result,
    map_step,
    settings_of,
    word_weights,
    write_downloads,
)
from diffusion.editor.views import (
    CSS,
    MAX_WEIGHT,
    SLIDERS,
    View,
    error_html,
    result_html,
    slider_states,
    status_html,
    swap_html,
    update,
    update_weight,
)
from diffusion.errors import UserError, exit_on_user_error

DEFAULT_MODEL = "runs/shapes/model"
STATUS_SECONDS = 2.0  # how often an open page asks whether the compiled UNet has taken over


@dataclass
class Handlers:
    """The page's event handlers around one editor. Gradio names each endpoint of its API after
    its function (on_render, on_swap, on_downloads; the weight sliders' lambda), which
    bench/bench_editor_load.py calls by name."""

    editor: Editor
    folders: DownloadFolders

    def slider_updates(self, prompt: str, result: Result | None) -> list:
        """`slider_states` as Gradio updates, then the note on words without a slider."""
        import gradio as gr

        words = word_weights(prompt)
        more = len(words) > SLIDERS
        note = f"Only the first {SLIDERS} words have sliders; weight the others in the prompt: `(word:1.5)`."
        return [gr.update(**state) for state in slider_states(words, result)] + [
            gr.update(visible=more, value=note if more else "")
        ]

    def show(self, prompt: str, view: View, step: int) -> list:
        """The word-weights tab's outputs (error, maps, step slider, result, sliders, note) for `view`."""
        import gradio as gr

        if view.error:  # the last good result stays on screen as it is
            return [gr.update(value=view.error, visible=True)] + [gr.skip()] * (3 + SLIDERS + 1)
        step = min(step, view.result.steps)
        return [
            gr.update(value="", visible=False),
            result_html(view.result, step),
            gr.update(maximum=view.result.steps, value=step),
            view.result,
            *self.slider_updates(prompt, view.result),
        ]

    def on_downloads(self, result: Result) -> list[str]:
        return [str(f) for f in write_downloads({"image": result}, self.folders.next(), self.editor.model)]

    def on_render(self, prompt, step, last, *controls):
        try:
            settings, step = settings_of(*controls), map_step(step)
        except UserError as error:
            return self.show(prompt, View(last, error_html(error)), 0)
        return self.show(prompt, update(self.editor, prompt, settings, last), step)

    def on_weight(self, index, prompt, weight, step, last, *controls):
        try:
            settings, step = settings_of(*controls), map_step(step)
        except UserError as error:
            return [prompt] + self.show(prompt, View(last, error_html(error)), 0)
        prompt, view = update_weight(self.editor, prompt, index, weight, settings, last)
        return [prompt] + self.show(prompt, view, step)

    def on_typed(self, prompt, last):
        import gradio as gr

        try:
            return self.slider_updates(prompt, last)
        except UserError:  # half-typed brackets: shown as an error only when rendered
            return [gr.skip()] * (SLIDERS + 1)

    def on_step(self, step, last):
        import gradio as gr

        try:
            return result_html(last, min(map_step(step), last.steps))
        except UserError:
            return gr.skip()

    def on_swap(self, source, edit, edit_steps, keep_layout, *controls):
        import gradio as gr

        try:
            settings = settings_of(*controls)
            results = self.editor.swap(source, edit, float(edit_steps), settings, KEEP_LAYOUT[keep_layout])
        except UserError as error:
            return gr.update(value=error_html(error), visible=True), gr.skip(), gr.skip()
        files = write_downloads(dict(zip(("source", "edit"), results)), self.folders.next(), self.editor.model)
        return gr.update(value="", visible=False), swap_html(*results), [str(f) for f in files]

    def on_status(self):
        """The status line, and the timer that asks again while the compile is under way."""
        import gradio as gr

        return status_html(self.editor), gr.Timer(active=self.editor.compiling)


def settings_controls(gr) -> list:
    """The sampling settings' controls, in `settings_of`'s order."""
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
    return [mode, context, seed, sampler, steps, guidance, images]


def weights_tab(gr, first: Result, first_files: list[str]) -> dict:
    """The word-weights tab, opening on `first`; its components by name."""
    tab = {"error": gr.HTML("", visible=False, elem_id="error")}  # full width: the caret line must not wrap
    with gr.Row():
        with gr.Column(scale=2, min_width=320):
            tab["prompt"] = gr.Textbox(
                DEFAULT_PROMPT,
                label="Prompt",
                elem_id="prompt",
                max_lines=1,
                info="Enter renders; weights as (red:1.5), (red), [red]",
            )
            tab["render"] = gr.Button("Render", variant="primary")
            gr.Markdown("**Word weights** (1 = unchanged; release a slider to render)")
            with gr.Row():  # two sliders a row where they fit
                shown = slider_states(word_weights(DEFAULT_PROMPT), first)
                slider = {"minimum": 0, "maximum": MAX_WEIGHT, "value": 1, "step": 0.05, "min_width": 200}
                tab["sliders"] = [gr.Slider(**{**slider, "elem_classes": "word-weight", **s}) for s in shown]
            tab["more_words"] = gr.Markdown("", visible=False)
        with gr.Column(scale=3):
            tab["step"] = gr.Slider(
                0,
                first.steps,
                value=0,
                step=1,
                label="Step of the maps",
                info="0 = averaged over all steps",
                elem_id="step",
            )
            tab["maps"] = gr.HTML(result_html(first), elem_id="maps")
            tab["downloads"] = gr.File(
                first_files,
                label="Downloads: images (PNG with prompt and settings), attention panels and raw maps (safetensors)",
                file_count="multiple",
                interactive=False,
                elem_id="downloads",
            )
    return tab


def swap_tab(gr) -> dict:
    """The word-swap tab; its components by name."""
    tab = {}
    with gr.Row():
        tab["source"] = gr.Textbox(DEFAULT_PROMPT, label="Source prompt", elem_id="source", max_lines=1)
        tab["edit"] = gr.Textbox(DEFAULT_EDIT, label="Edited prompt", elem_id="edit", max_lines=1)
    with gr.Row():
        tab["edit_steps"] = gr.Slider(
            0,
            1,
            value=DEFAULT_EDIT_STEPS,
            step=0.05,
            label="Edit steps",
            info="fraction of the steps that keep the source's maps",
        )
        tab["keep_layout"] = gr.Radio(
            list(KEEP_LAYOUT),
            value="auto",
            label="Keep layout",
            info="the other words keep the source's maps at every step (auto: for colour and size swaps)",
            elem_id="keep-layout",
        )
        tab["swap"] = gr.Button("Swap", variant="primary", elem_id="swap-button")
    tab["error"] = gr.HTML("", visible=False, elem_id="swap-error")
    tab["view"] = gr.HTML("", elem_id="swap-view")
    tab["downloads"] = gr.File(label="Downloads", file_count="multiple", interactive=False)
    return tab


def wire(handlers: Handlers, controls: list, last_result, weights: dict, swap: dict) -> None:
    """Connect the components' events to `handlers`. The files are written after the page shows
    the result, not before (they take a few ms). Cheap handlers run outside the queue, so they
    never wait behind a render."""
    after = {"queue": False, "show_progress": "hidden"}
    outputs = [weights["error"], weights["maps"], weights["step"], last_result, *weights["sliders"]]
    outputs.append(weights["more_words"])
    prompt, step = weights["prompt"], weights["step"]
    for event in (prompt.submit, weights["render"].click):
        event(handlers.on_render, [prompt, step, last_result, *controls], outputs).then(
            handlers.on_downloads, last_result, weights["downloads"], **after
        )
    for index, slider in enumerate(weights["sliders"]):
        slider.release(
            lambda *args, index=index: handlers.on_weight(index, *args),
            [prompt, slider, step, last_result, *controls],
            [prompt, *outputs],
        ).then(handlers.on_downloads, last_result, weights["downloads"], **after)
    prompt.input(handlers.on_typed, [prompt, last_result], [*weights["sliders"], weights["more_words"]], **after)
    step.release(handlers.on_step, [step, last_result], weights["maps"], **after)
    swap["swap"].click(
        handlers.on_swap,
        [swap["source"], swap["edit"], swap["edit_steps"], swap["keep_layout"], *controls],
        [swap["error"], swap["view"], swap["downloads"]],
    )


def build_page(editor: Editor, first: Result):
    """The Gradio page around `editor`; `first` is the warm-up render it opens with."""
    import gradio as gr

    handlers = Handlers(editor, DownloadFolders())
    with gr.Blocks(title="Attention editor", analytics_enabled=False, delete_cache=(600, 3600)) as page:
        gr.Markdown(f"## Attention editor &middot; `{html.escape(editor.model)}`")
        status = gr.HTML(status_html(editor), elem_id="status")
        timer = gr.Timer(STATUS_SECONDS)  # stops itself once no compile is under way
        controls = settings_controls(gr)
        last_result = gr.State(first)  # per browser tab: what the step slider redraws
        with gr.Tabs():
            with gr.Tab("Word weights", id="weights"):
                weights = weights_tab(gr, first, handlers.on_downloads(first))
            with gr.Tab("Word swap", id="swap"):
                swap = swap_tab(gr)
        wire(handlers, controls, last_result, weights, swap)
        for event in (timer.tick, page.load):
            event(handlers.on_status, None, [status, timer], queue=False, show_progress="hidden")
    return page.queue(default_concurrency_limit=1)


def parse_arguments(argv) -> argparse.Namespace:
    """The command line, checked; a UserError for a value out of range."""
    parser = ArgumentParser(description="A live attention editor for a trained model, in the browser.")
    add_model_options(
        parser,
        required=False,
        precision_help="autocast of the UNet (default auto: for one image with guidance, float32 where a "
        "start-up timing finds it clearly faster; else bf16 where the device does it natively)",
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)"
    )
    parser.add_argument("--port", type=int, default=7860, help="port to listen on (default 7860)")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for torch (default: torch's, one per core). Beside a training run, 1 "
        "keeps the two from spinning against each other, which slows a render several times",
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
        help="skip torch.compile of the UNet for one-image renders, which otherwise runs in the background "
        "after the page is served (a minute or more on a 2-core CPU) and makes a render about 1.7x faster",
    )
    args = parser.parse_args(argv)
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
    return args


@exit_on_user_error
def main(argv=None):
    args = parse_arguments(argv)
    one_line_warnings()
    try:
        import gradio  # noqa: F401  (optional: the app extra)
    except ImportError:
        raise UserError('the editor needs Gradio: pip install -e ".[app]"') from None

    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    editor = Editor.load(args.model or DEFAULT_MODEL, device=args.device, mixed_precision=args.mixed_precision)
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
        f"{first.seconds * 1000:.0f} ms uncompiled): http://{args.host}:{args.port}",
        flush=True,
    )
    if editor.not_compiled:
        print(f"note: {editor.not_compiled}; renders run uncompiled", flush=True)
    elif not args.no_compile:
        print(
            "compiling the UNet for one-image renders in the background (a minute or more on 2 CPU cores; "
            "--no-compile skips it); renders run uncompiled until it is ready",
            flush=True,
        )
        editor.compile_in_background()
    page.block_thread()


if __name__ == "__main__":
    tune_malloc()  # PyTorch on CPU: faster steps (diffusion/cli.py)
    main()
