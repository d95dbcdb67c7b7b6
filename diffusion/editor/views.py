"""The editor's HTML views: what the page (app.py) shows of a render, a swap or an error, and the
state of its weight sliders. Plain Python and HTML over `service` results, no Gradio, so tests and
benches build the same views the page shows.
"""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass

from PIL import Image

from diffusion.editor.service import Editor, Result, Settings, WordWeight, precision_name, reweight, word_weights
from diffusion.errors import UserError
from diffusion.images import attention_shares, heat_overlay

SLIDERS = 16  # weight sliders on the page: the prompt's first 16 words get one
MAX_WEIGHT = 4.0
IMAGE_SIDE = 256  # shown size of an image; maps are shown at half of it


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


def status_html(editor: Editor) -> str:
    """The page's status line: which UNet renders run on (`Editor.status`)."""
    return f'<p class="render-status">{html.escape(editor.status())}</p>'


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
.render-status { font-size: 13px; color: var(--body-text-color-subdued); margin: 0; }
"""
