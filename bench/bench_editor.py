"""Latency of one update of the attention editor (app.py, diffusion/editor/), measured the way the page runs it.

    python bench/bench_editor.py [--model runs/shapes/model] [--n 30] [--threads 2] [--no-compile] [--json F]

1. Start-up: `Editor.load` (which times the UNet in float32 and bf16 to choose the precision of
   small batches) and its warm-up; then, when Gradio is installed, `python app.py` itself, timed
   from launch until its page answers (it compiles in the background after that) and until its
   log says the renders switched to the compiled UNet.
2. Updates: what a released weight slider runs before the page shows the result
   (`views.update_weight`: rewrite the prompt, sample it with each word's map at every step; then
   `views.result_html`), N times, each with a new weight so that the prompt's encoding is never
   remembered: 1 image, 20 steps, guidance 3, Euler. First uncompiled, then after
   `Editor.compile` (timed; it compiles float32 and bf16, times renders of each and keeps the
   faster), as app.py runs by default. Prints the median and p90 latency, and
   apart from it the downloads the page writes afterwards. Gradio's own transport is not in it.
3. Against `Pipeline.__call__` (eager) with the same settings and the precision the editor chose:
   the compiled one-image render differs by rounding (levels printed), four images (8 rows)
   run eagerly and are bit-identical.
4. Precision: one UNet call per batch size in float32 and in bf16 autocast (what
   `service.FLOAT32_MAX_BATCH` rests on), taking turns, median of 10.

Other jobs on the CPU slow every number here; compare runs on an idle machine.
"""

import argparse
import atexit
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from bench_editor_load import percentile, serve  # bench/, this script's folder

from diffusion.cli import tune_malloc


def server_start_seconds(model: str, threads: int | None, no_compile: bool) -> tuple[float | None, float | None]:
    """Seconds from starting `python app.py` until its page answers, and until its log says the
    renders run compiled (None: without Gradio, or not compiling)."""
    try:
        import gradio  # noqa: F401
    except ImportError:
        return None, None
    with serve(model, compile=not no_compile, threads=threads) as server:
        answered = time.perf_counter()
        while not no_compile and "renders: compiled" not in server.log_text():
            if "torch.compile failed" in server.log_text() or time.perf_counter() - answered > 900:
                return server.start_seconds, None
            time.sleep(0.5)
        compiled = None if no_compile else server.start_seconds + time.perf_counter() - answered
        return server.start_seconds, compiled


def start_up(args, service):
    """Load the editor as app.py does, time the text encoder, compile (unless --no-compile) and
    start `python app.py`. Returns the editor, its warm-up render and the start-up figures."""
    start = time.perf_counter()
    editor = service.Editor.load(args.model)
    loaded = time.perf_counter() - start
    last = editor.warm_up()
    figures = {"start-up s": round(time.perf_counter() - start, 2)}
    print(
        f"start-up: model loaded and precision timed in {loaded:.2f} s, warm (two renders) after "
        f"{figures['start-up s']:.2f} s; precision: {editor.precision_note()}"
    )
    encodings = []
    for i in range(10):
        begin = time.perf_counter()
        editor.pipeline.encoder.encode([f"a red circle on the left {i}"])  # new prompts: none remembered
        encodings.append(time.perf_counter() - begin)
    print(f"text encoding: {statistics.median(encodings) * 1000:.1f} ms a prompt (what each remembered one saves)")
    figures["compile s"] = None
    if not args.no_compile:
        figures["compile s"] = round(editor.compile(), 1)
        print(
            f"start-up: compiled for one-image renders in {figures['compile s']:.1f} s (an empty inductor cache); "
            f"precision: {editor.precision_note()}"
        )
    served, switched = server_start_seconds(args.model, args.threads, args.no_compile)
    if served is not None:
        switch = f", its renders ran compiled after {switched:.1f} s (the inductor cache this run filled)"
        print(f"start-up: python app.py answered after {served:.2f} s{switch if switched else ''}")
    figures["page answers s"] = None if served is None else round(served, 2)
    figures["renders compiled after s"] = None if switched is None else round(switched, 1)
    return editor, last, figures


def time_updates(editor, last, n: int, service, views) -> dict:
    """N slider updates (`views.update_weight` and its `result_html`), uncompiled and compiled in
    turn, so that a change in the machine's speed while the bench runs (other jobs, clocks)
    touches both alike; and the downloads written after each. Prints and returns the figures."""
    settings = service.Settings()  # 1 image, 20 steps, guidance 3, Euler, attention mode
    pipeline = editor.pipelines[editor.small_batch_precision]
    compiled_unet = pipeline.fast_unet
    kinds = ["uncompiled"] + (["compiled"] if compiled_unet is not None else [])
    times, render_times, download_times = {k: [] for k in kinds}, {k: [] for k in kinds}, []
    prompt = service.DEFAULT_PROMPT
    with tempfile.TemporaryDirectory() as folder:
        for i in range(n):
            weight = round(0.5 + 0.05 * i, 2)  # a new prompt each time, as when a slider moves
            for kind in kinds:
                pipeline.fast_unet = compiled_unet if kind == "compiled" else None
                begin = time.perf_counter()
                new_prompt, view = views.update_weight(editor, prompt, 1, weight, settings, last)
                views.result_html(view.result)
                times[kind].append(time.perf_counter() - begin)
                assert not view.error, view.error
                render_times[kind].append(view.result.seconds)
            begin = time.perf_counter()
            service.write_downloads({"image": view.result}, Path(folder), editor.model)
            download_times.append(time.perf_counter() - begin)
            prompt, last = new_prompt, view.result
    pipeline.fast_unet = compiled_unet
    precision = editor.precision(settings.unet_batch(1))
    what = f"1 image, {settings.steps} steps, guidance {settings.guidance:g}, maps at every step, {precision}"
    for kind in kinds:
        print(
            f"update, {kind} ({n}x: {what}): median {statistics.median(times[kind]) * 1000:.0f} ms, "
            f"p90 {percentile(times[kind], 0.9) * 1000:.0f} ms (sampling and maps alone: median "
            f"{statistics.median(render_times[kind]) * 1000:.0f} ms)"
        )
    print(f"the downloads written after an update: {statistics.median(download_times) * 1000:.0f} ms")
    shown = kinds[-1]  # what app.py runs
    return {
        "update median ms": round(statistics.median(times[shown]) * 1000, 1),
        "update p90 ms": round(percentile(times[shown], 0.9) * 1000, 1),
        "sampling and maps median ms": round(statistics.median(render_times[shown]) * 1000, 1),
        "uncompiled update median ms": round(statistics.median(times["uncompiled"]) * 1000, 1),
        "uncompiled update p90 ms": round(percentile(times["uncompiled"], 0.9) * 1000, 1),
        "precision": precision,
    }


def against_pipeline(editor, service) -> None:
    """The editor's renders against `Pipeline.__call__` with the same settings and precision."""
    import numpy as np
    import torch

    from diffusion.sampling.pipeline import Pipeline, Weighting

    cases = [
        ("a (red:0) circle on the left", service.Settings()),
        ("a red circle on the (left:2)", service.Settings(num_images=4, seed=3, weight_mode="embedding")),
    ]
    for prompt, settings in cases:
        result = editor.render(prompt, settings)
        precision = editor.precision(settings.unet_batch(settings.num_images))
        parts = (editor.pipeline.unet, editor.pipeline.encoder, editor.pipeline.scheduler_config)
        expected = Pipeline.from_parts(*parts, editor.pipeline.device, precision)(
            prompt,
            num_images_per_prompt=settings.num_images,
            seed=settings.seed,
            weighting=Weighting(settings.weight_mode, context=settings.weight_context),
            attention_maps=True,
            progress=False,
        )
        pixels = [
            np.abs(np.asarray(a, int) - np.asarray(b, int)).max() for a, b in zip(result.output.images, expected.images)
        ]
        maps_equal = all(
            torch.equal(a[word], b[word])
            for a, b in zip(result.output.attention_maps, expected.attention_maps)
            for word in a
        )
        compiled = editor.compiled and settings.num_images == 1
        print(
            f"{'compiled' if compiled else 'eager'} editor against Pipeline.__call__ ({settings.num_images} "
            f"image(s), {precision}): images "
            f"{'bit-identical' if max(pixels) == 0 else f'up to {max(pixels)} levels apart'}, "
            f"maps {'bit-identical' if maps_equal else 'not bit-identical'}"
        )


def precision_table(editor, service) -> None:
    """One UNet call per batch size in float32 and bf16, taking turns."""
    from diffusion.sampling.pipeline import Pipeline

    print("UNet call (ms), median of 10, float32 and bf16 taking turns:")
    parts = (editor.pipeline.unet, editor.pipeline.encoder, editor.pipeline.scheduler_config, editor.pipeline.device)
    both = {precision: Pipeline.from_parts(*parts, precision) for precision in ("no", "bf16")}
    for batch in (1, 2, 4, 8):
        ms = service.unet_milliseconds(both, batch, repeats=10)
        print(
            f"  batch {batch}: float32 {ms['no']:.1f}, bf16 {ms['bf16']:.1f} -> "
            f"{'float32' if ms['no'] <= ms['bf16'] else 'bf16'} faster; the editor uses {editor.precision(batch)}"
        )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="runs/shapes/model")
    parser.add_argument("--n", type=int, default=30, help="updates to time (default 30)")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads, as app.py --threads (default: torch's)"
    )
    parser.add_argument("--json", help="also write the start-up and update times to this JSON file")
    parser.add_argument("--no-compile", action="store_true", help="time the uncompiled editor only")
    args = parser.parse_args()

    # An empty inductor cache, so that the compile time is what a first start pays; app.py,
    # started after it, finds the code this run compiled, as a second start does.
    cache = tempfile.mkdtemp(prefix="bench-editor-inductor-")
    atexit.register(shutil.rmtree, cache, True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache

    import torch

    from diffusion.editor import service, views

    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
        f"huge pages: {'glibc.malloc.hugetlb=1' in os.environ.get('GLIBC_TUNABLES', '')}"
    )
    editor, last, start_figures = start_up(args, service)
    update_figures = time_updates(editor, last, args.n, service, views)
    if args.json:
        record = {"threads": torch.get_num_threads(), "compiled": editor.compiled, **start_figures, **update_figures}
        record["compiled render ms by precision"] = {
            service.precision_name(p): round(ms) for p, ms in editor.render_ms.items()
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(record, indent=1) + "\n")
    against_pipeline(editor, service)
    precision_table(editor, service)


if __name__ == "__main__":
    tune_malloc()  # as app.py runs
    main()
