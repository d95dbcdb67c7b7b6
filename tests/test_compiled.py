"""The compiled UNet (diffusion/editor/compiled.py): the eager UNet's images and maps up to rounding, one
graph per batch size and weighting (never one per step), and eager wherever it cannot stand in."""

from pathlib import Path

import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters

from diffusion.control.controllers import AttentionRecorder
from diffusion.control.weighting import Weighting
from diffusion.editor.compiled import CompiledUNet
from diffusion.model.attention import AttentionController, GraphRequest
from diffusion.sampling.pipeline import Pipeline

SMALL_MODEL = Path(__file__).resolve().parents[1] / "tests" / "assets" / "small-shapes"


@pytest.fixture(scope="module")
def pipelines():
    """(eager, compiled) float32 pipelines sharing one UNet; the compiled one compiles calls of
    2 rows (one image with guidance)."""
    eager = Pipeline.from_pretrained(SMALL_MODEL, device="cpu", mixed_precision="no")
    compiled = Pipeline.from_parts(eager.unet, eager.encoder, eager.scheduler_config, "cpu", "no")
    compiled.fast_unet = CompiledUNet(compiled.unet, {2})
    return eager, compiled


def levels_apart(a, b) -> int:
    return int(np.abs(np.asarray(a, int) - np.asarray(b, int)).max())


def render(pipeline, prompt, **kwargs):
    recorder = AttentionRecorder(pipeline.unet.config.sample_size, keep_history=True)
    settings = {"seed": 3, "steps": 4, "progress": False, **kwargs}
    output = pipeline(prompt, attention_controller=recorder, attention_maps=True, **settings)
    return output, recorder


@pytest.mark.parametrize("prompt", ["a red circle on the left", "a (red:0) circle on the left", "a (circle:2)"])
def test_compiled_renders_match_the_eager_unet_up_to_rounding(pipelines, prompt):
    eager, compiled = pipelines
    expected, expected_recorder = render(eager, prompt)
    output, recorder = render(compiled, prompt)
    assert levels_apart(output.images[0], expected.images[0]) <= 2
    for word, word_map in expected.attention_maps[0].items():
        assert torch.allclose(output.attention_maps[0][word], word_map, atol=1e-4)
    # the recorder saw every step and every site, as it does on the eager UNet
    assert sorted(recorder.history) == sorted(expected_recorder.history) == list(range(4))
    assert recorder.calls == expected_recorder.calls
    assert torch.allclose(recorder.history[2], expected_recorder.history[2], atol=1e-4)


def test_steps_and_new_weights_reuse_the_compiled_graphs(pipelines):
    _, compiled = pipelines
    render(compiled, "a (red:0.5) circle")  # builds (or finds) the graphs with and without weights
    render(compiled, "a red circle")
    graphs = counters["stats"]["unique_graphs"]
    render(compiled, "a (blue:1.7) square on the right")
    render(compiled, "a green triangle", steps=6)
    assert counters["stats"]["unique_graphs"] == graphs


def test_word_swaps_and_other_batch_sizes_stay_on_the_eager_unet(pipelines):
    eager, compiled = pipelines
    expected = eager.swap("a red circle", "a blue circle", seed=1, steps=4, guidance=1.0)  # 2 rows
    swapped = compiled.swap("a red circle", "a blue circle", seed=1, steps=4, guidance=1.0)
    assert all(levels_apart(a.images[0], b.images[0]) == 0 for a, b in zip(swapped, expected))
    expected = eager("a (red:2) circle", num_images_per_prompt=2, seed=5, steps=4)  # 4 rows: not compiled
    output = compiled("a (red:2) circle", num_images_per_prompt=2, seed=5, steps=4)
    assert all(levels_apart(a, b) == 0 for a, b in zip(output.images, expected.images))
    expected = eager("a (red:2) circle", num_images_per_prompt=3, seed=5, steps=4)  # 6 and 3 rows: neither
    output = compiled("a (red:2) circle", num_images_per_prompt=3, seed=5, steps=4)
    assert all(levels_apart(a, b) == 0 for a, b in zip(output.images, expected.images))


def test_an_unguided_call_runs_on_the_graph_of_twice_its_rows(pipelines, monkeypatch):
    """Past the guidance cutoff (and at guidance 1) one image calls the UNet with 1 row: it runs on
    the 2-row graph, its row given twice, with no graph of its own; image and maps are the eager
    UNet's up to rounding."""
    eager, compiled = pipelines
    render(compiled, "a (red:0.5) circle")  # the 2-row graphs, with and without weights
    render(compiled, "a red circle")
    graphs = counters["stats"]["unique_graphs"]
    graph, rows = compiled.fast_unet._graph, []

    def counted(*arguments):
        rows.append(arguments[0].shape[0])
        return graph(*arguments)

    monkeypatch.setattr(compiled.fast_unet, "_graph", counted)
    for prompt, kwargs in [("a (red:2) circle", {"guidance": 1.0}), ("a blue square", {"guidance_cutoff": 0.25})]:
        expected, expected_recorder = render(eager, prompt, **kwargs)
        output, recorder = render(compiled, prompt, **kwargs)
        assert levels_apart(output.images[0], expected.images[0]) <= 2
        assert recorder.calls == expected_recorder.calls
        for word, word_map in expected.attention_maps[0].items():
            assert torch.allclose(output.attention_maps[0][word], word_map, atol=1e-4)
    assert rows == [2] * 8  # every step of both renders on the 2-row graph
    assert counters["stats"]["unique_graphs"] == graphs


def test_a_call_unlike_the_compiled_ones_gets_its_own_graph(pipelines):
    """Calls seen before skip dynamo's guards (diffusion/editor/compiled.py); anything that changes what
    the graph computes must still reach a graph of its own: weights at some resolutions only, no
    maps recorded, a weight window that leaves some steps unweighted."""
    eager, compiled = pipelines
    render(compiled, "a (red:0.5) circle")  # graphs with and without weights, at every resolution
    render(compiled, "a red circle")
    resolutions = set(eager.unet.config.attention_resolutions[:1])
    for weighting in (Weighting(resolutions=resolutions), Weighting(steps=(0.0, 0.5))):
        expected, _ = render(eager, "a (red:0) circle on the left", weighting=weighting)
        output, _ = render(compiled, "a (red:0) circle on the left", weighting=weighting)
        assert levels_apart(output.images[0], expected.images[0]) <= 2
    expected = eager("a (green:3) square", seed=2, steps=4, progress=False)
    output = compiled("a (green:3) square", seed=2, steps=4, progress=False)  # no maps asked for
    assert levels_apart(output.images[0], expected.images[0]) <= 2


def test_compiled_unets_in_float32_and_bf16_take_turns(pipelines):
    """The editor compiles both precisions to time them (app.py): two instances on one UNet, whose
    graphs differ only in autocast, each keep running their own."""
    eager, _ = pipelines
    parts = (eager.unet, eager.encoder, eager.scheduler_config, "cpu")
    eager_bf16 = Pipeline.from_parts(*parts, "bf16")
    compiled = {precision: Pipeline.from_parts(*parts, precision) for precision in ("no", "bf16")}
    for pipeline in compiled.values():
        pipeline.fast_unet = CompiledUNet(pipeline.unet, {2})
    # bf16 keeps 8 bits of mantissa, and fused kernels round at other places than eager ones
    tolerance = {"no": 2, "bf16": 8}
    for _ in range(2):
        for precision, reference in (("bf16", eager_bf16), ("no", eager)):
            expected, _ = render(reference, "a (red:2) circle", steps=2)
            output, _ = render(compiled[precision], "a (red:2) circle", steps=2)
            assert levels_apart(output.images[0], expected.images[0]) <= tolerance[precision]


def test_any_controller_runs_in_the_graph_through_graph_request(pipelines):
    """compiled.py knows controllers by their `graph_request` only: a kind of its own that asks for
    the maps gets every site's, one head (the mean), where one that does not ask runs eagerly."""
    _, compiled = pipelines

    class Counter(AttentionController):
        def __init__(self):
            self.sites = []

        def wants(self, site):
            return True

        def process(self, site, probabilities):
            self.sites.append((site.name, site.step, probabilities.shape[1]))

    class GraphCounter(Counter):
        def graph_request(self, step, num_steps):
            return GraphRequest(recorders=(self,))

    eager_only, in_graph = Counter(), GraphCounter()
    for controller in (eager_only, in_graph):
        compiled("a red circle", seed=1, steps=2, attention_controller=controller, progress=False)
    assert [site[:2] for site in in_graph.sites] == [site[:2] for site in eager_only.sites]
    heads = compiled.unet.config.attention_heads
    assert {site[2] for site in eager_only.sites} == {heads} and {site[2] for site in in_graph.sites} == {1}
