"""The UNet compiled for sampling, with per-word weights and recorded maps inside the graph.

At one image with guidance the UNet's call on two CPU cores is mostly per-op overhead (about 200
small kernels of batch 2), which torch.compile (inductor, weights frozen into prepacked
convolutions) removes; the editor (diffusion/editor/service.py) uses it to render in time for a slider.

A controller is Python that keeps state across calls (the recorder's running sums, its per-step
history), and a compiled graph that reads such state would be recompiled at every step. So the
graph gets tensors only: the caller's controller says what it needs at this step
(`AttentionController.graph_request`: per-token weights, their resolutions, who records), and
the graph returns, next to the prediction, every cross-attention site's map of the conditional
rows (the mean over heads) when someone records. After the call those maps go to the recorders'
`process`, as the eager UNet would give them. A controller that answers None (word
swaps, local blend, a user's own) runs on the eager UNet, so results never depend on what was
compiled.

Images differ from the eager UNet's by rounding (fused kernels sum in another order), not
bit-identical; `tests/test_compiled.py` bounds the difference.
"""

from __future__ import annotations

import types

import torch
import torch._inductor.config

from diffusion.control.controllers import AttentionReweighter
from diffusion.model.attention import AttentionController, AttentionSite, GraphRequest
from diffusion.model.unet import UNet


class _GraphController(AttentionController):
    """Traced inside the compiled graph: reweight, then keep each site's conditional rows' mean over
    heads (none when `record` is False). The recorders upsample them outside the graph, where
    eager interpolation runs faster than inductor's (a render 1.1x faster).

    Its state lives for one UNet call, so the graph never depends on what earlier calls did."""

    def __init__(self, weights: torch.Tensor | None, resolutions: frozenset[int] | None, record: bool):
        self.weights = weights
        self.resolutions = resolutions
        self.record = record
        self.maps: list[tuple[str, tuple[int, int], torch.Tensor]] = []

    def wants(self, site: AttentionSite) -> bool:
        return True

    def process(self, site: AttentionSite, probabilities: torch.Tensor) -> torch.Tensor:
        if self.weights is not None and (self.resolutions is None or site.resolution[0] in self.resolutions):
            probabilities = AttentionReweighter(self.weights).process(site, probabilities)
        if self.record:
            self.maps.append((site.name, site.resolution, probabilities[site.conditional].float().mean(1)))
        return probabilities


def not_compiled_because(unet) -> str | None:
    """Why `CompiledUNet` cannot take `unet` (None: it can). The graph hands its controller to this
    project's UNet; a diffusers UNet (model.kind unet2d, or a Stable Diffusion folder's) reaches its
    controllers through the attention adapter's Python state, which a graph would rebuild at every step."""
    if isinstance(unet, UNet):
        return None
    return f"{type(unet).__name__} is not compiled: a diffusers UNet's controllers run in its attention processors"


class CompiledUNet:
    """Call it as the UNet is called when sampling (`UNet.forward`'s arguments).

    unet: the model; its weights are frozen into the compiled graph, so they must not change
    afterwards. batch_sizes: the numbers of rows whose calls are compiled; an unguided call of half
    a compiled size runs on that size's graph, its rows given twice; calls of other sizes run on
    the eager UNet, so that a new size never stalls a render to compile (None: every size).
    The first call at each batch size, with and without weights, compiles (seconds to a minute on
    a CPU); later calls reuse it."""

    def __init__(self, unet: UNet, batch_sizes: set[int] | None = None):
        self.unet = unet
        self.batch_sizes = batch_sizes
        # Dynamo keeps compiled graphs on the function's code object, which every instance would
        # share; a copy of the code per instance keeps its graphs, and the guards that tell them
        # apart, its own. For correctness, not speed (it gains nothing measurable on an update): a
        # float32 and a bf16 instance's graphs differ only in global state, which the guards
        # skipped in `__call__` leave out, so on a shared code object one could run the other's.
        code = CompiledUNet._forward.__code__.replace()
        forward = types.FunctionType(code, CompiledUNet._forward.__globals__, "_forward")
        self._graph = torch.compile(types.MethodType(forward, self), dynamic=False)
        self._compiled: set[tuple] = set()  # the `_signature`s of the calls compiled so far

    def _forward(self, sample, timestep, context, mask, conditional, weights, resolutions, record):
        controller = _GraphController(weights, resolutions, record)
        prediction = self.unet(sample, timestep, context, mask, controller, conditional=conditional)
        return prediction, controller.maps

    def __call__(
        self,
        sample: torch.Tensor,
        timestep,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor | None = None,
        attention_controller: AttentionController | None = None,
        step: int | None = None,
        num_steps: int | None = None,
        conditional: slice = slice(None),
    ) -> torch.Tensor:
        rows = sample.shape[0]
        other_size = self.batch_sizes is not None and rows not in self.batch_sizes
        if other_size and 2 * rows in self.batch_sizes and len(range(rows)[conditional]) == rows:
            # An unguided call (past the guidance cutoff, or guidance 1) of half a compiled size: on a
            # CPU such small calls cost their kernels' overhead, not their rows, so the graph of
            # twice the rows, given them twice with the conditional slice second, is faster than
            # the eager UNet and needs no graph (and no compile) of its own.
            twice = self(
                torch.cat([sample, sample]),
                timestep,
                torch.cat([encoder_hidden_states, encoder_hidden_states]),
                None if encoder_attention_mask is None else torch.cat([encoder_attention_mask] * 2),
                attention_controller,
                step,
                num_steps,
                slice(rows, 2 * rows),
            )
            return twice[rows:]
        request = (
            GraphRequest() if attention_controller is None else attention_controller.graph_request(step, num_steps)
        )
        if other_size or request is None:
            return self.unet(
                sample,
                timestep,
                encoder_hidden_states,
                encoder_attention_mask,
                attention_controller,
                step,
                num_steps,
                conditional,
            )
        arguments = (
            sample,
            timestep,
            encoder_hidden_states,
            encoder_attention_mask,
            conditional,
            None if request.weights is None else request.weights.to(sample.device),
            request.resolutions,
            request.record,
        )
        signature = _signature(arguments)
        if signature in self._compiled and len({seen[-3:] for seen in self._compiled}) == 1:
            # Dynamo checks a guard for every parameter at every call, a visible share of a
            # one-image render (an update's gain: bench/README.md); a call whose signature has been
            # compiled before skips all but the guards that tell this instance's graphs apart.
            # Those leave out the global state (autocast, grad mode), so this holds only while
            # every graph of this instance shares it (hence the code copy per instance above).
            with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
                prediction, maps = self._graph(*arguments)
        else:
            # Read when a graph is compiled (`torch.compile(options=...)` does not reach them):
            # freezing makes the weights constants, prepacked for oneDNN (the largest gain of the
            # three); the C++ wrapper calls the kernels from C++ instead of Python (faster calls
            # for a longer compile). Each one's gain on an update: bench/README.md.
            with torch._inductor.config.patch(freezing=True, cpp_wrapper=True):
                prediction, maps = self._graph(*arguments)
            self._compiled.add(signature)
        for name, resolution, site_maps in maps:
            site = AttentionSite(name, resolution, step, num_steps)  # the maps hold the conditional rows only
            for recorder in request.recorders:
                if recorder.wants(site):
                    recorder.process(site, site_maps[:, None])  # one "head": the mean over heads
        return prediction


def _signature(arguments: tuple) -> tuple:
    """What a compiled graph depends on, beyond the frozen weights: the tensors' shapes, dtypes
    and devices, every other argument's value, and the autocast and grad modes the call runs in.
    Two calls with the same signature run the same graph, so the second needs no guards checked."""

    def describe(value):
        if isinstance(value, torch.Tensor):
            return ("tensor", tuple(value.shape), value.dtype, value.device)
        if isinstance(value, slice):
            return ("slice", value.start, value.stop, value.step)
        return value

    device = arguments[0].device.type
    modes = (torch.is_autocast_enabled(device), torch.get_autocast_dtype(device), torch.is_grad_enabled())
    return tuple(describe(value) for value in arguments) + modes
