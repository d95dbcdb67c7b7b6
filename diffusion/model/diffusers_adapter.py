"""This project's attention controllers inside any diffusers `UNet2DConditionModel`.

The controllers (recorder, reweighter, injector, local blend) speak one interface,
`AttentionController` (diffusion/model/attention.py): for each cross-attention call they are
asked `wants(site)` and, if so, given the probabilities to read or edit. This project's UNet
asks them itself. A diffusers UNet (Stable Diffusion 1.x / 2.x, SDXL, or one trained here with
`model.kind: unet2d`) asks them through `AttentionAdapter`, which uses diffusers' own extension
point, attention processors (`unet.set_attn_processor`), not a patched `forward`:

    adapter = AttentionAdapter(unet)
    with adapter.sampling(recorder, num_steps=20, guidance=True):
        images = pipe(prompt, num_inference_steps=20).images     # any pipeline on that UNet

- Only the cross-attention layers (`attn2` of each transformer block) get a `ControlledProcessor`;
  self-attention keeps its own processor, untouched.
- A layer that no controller `wants` at a call runs its original processor (the fused
  `scaled_dot_product_attention`), so with no controller, or one that reads nothing, the images
  are bit for bit the stock ones, and recording costs only the layers it records.
- A controller that only reads (returns None) outside training also leaves the output to the
  original processor: recording never changes the image.
- `AttentionSite` carries the same information as in this project's UNet: the layer's module
  name ("up_blocks.1.attentions.0.transformer_blocks.0.attn2"), the resolution of its feature
  map (from the UNet input's height and width, so any aspect ratio and depth), the step, the
  number of steps and the conditional rows of the batch.
- Installing is a context manager, or `install()` / `remove()`; leaving it puts the UNet's
  previous processors back.

Where do the step and the conditional rows come from? `sampling(controller, num_steps, guidance,
batch)` counts the UNet's forward calls (a forward pre-hook, diffusers' pipelines call the UNet
once per step with the unconditional half of classifier-free guidance first); a caller that knows
them sets `adapter.call` before each UNet call (the unet2d model of diffusion/model/unet2d.py does).
"""

from __future__ import annotations

from contextlib import contextmanager

from torch import nn

from diffusion.errors import UserError
from diffusion.model.attention import AttentionCall, AttentionController, AttentionSite


class ControlledProcessor:
    """The attention processor of one cross-attention layer: asks the adapter's current call's
    controller whether it wants this site; if not, runs the layer's original processor."""

    def __init__(self, adapter: AttentionAdapter, name: str, original):
        self.adapter = adapter
        self.name = name
        self.original = original

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        call = self.adapter.call
        if call is None or hidden_states.ndim != 3 or encoder_hidden_states is None:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        resolution = self.adapter.resolution(hidden_states.shape[1])
        site = AttentionSite(self.name, resolution, call.step, call.num_steps, call.conditional)
        if not call.controller.wants(site):
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)

        probabilities, value = attention_probabilities(attn, hidden_states, encoder_hidden_states, attention_mask)
        edited = call.controller.process(site, probabilities)
        if edited is None and not probabilities.requires_grad:
            # Only read: the output still comes from the fused kernel, so recording never
            # changes the image (plain ops round differently).
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        out = (probabilities if edited is None else edited.to(value.dtype)) @ value  # (B, heads, N, d)
        B, heads, N, d = out.shape
        out = attn.to_out[1](attn.to_out[0](out.transpose(1, 2).reshape(B, N, heads * d).to(hidden_states.dtype)))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


def attention_probabilities(attn, hidden_states, encoder_hidden_states, attention_mask=None):
    """softmax(Q K^T / sqrt(d)) of a diffusers `Attention` layer as its `AttnProcessor2_0` computes
    them inside `scaled_dot_product_attention`: (B, heads, N, T), and the values (B, heads, T, d).
    attention_mask: the UNet's additive bias (B, 1, T) for masked keys (`encoder_attention_mask`)."""
    if attn.spatial_norm is not None or attn.group_norm is not None:
        raise UserError(
            "this attention layer normalises its input (spatial or group norm): not supported by the adapter"
        )
    B, N, _ = hidden_states.shape
    T = encoder_hidden_states.shape[1]
    query = attn.to_q(hidden_states)
    context = attn.norm_encoder_hidden_states(encoder_hidden_states) if attn.norm_cross else encoder_hidden_states
    key, value = attn.to_k(context), attn.to_v(context)
    heads = attn.heads
    d = key.shape[-1] // heads
    query = query.view(B, N, heads, d).transpose(1, 2)
    key = key.view(B, T, heads, d).transpose(1, 2)
    value = value.view(B, T, heads, d).transpose(1, 2)
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    scores = (query @ key.transpose(-1, -2)) * d**-0.5  # the fused kernel's default scale, as AttnProcessor2_0
    if attention_mask is not None:
        scores = scores + attn.prepare_attention_mask(attention_mask, T, B).view(B, heads, -1, T)
    return scores.softmax(dim=-1), value


class AttentionAdapter:
    """Puts `ControlledProcessor`s on every cross-attention layer of a diffusers
    `UNet2DConditionModel` (see the module docstring).

    call: what the next UNet calls tell the controllers (an `AttentionCall`), or None: every layer
    runs its own processor. Set it, or let `sampling` set it at each UNet call.
    """

    def __init__(self, unet: nn.Module):
        check_supported(unet)
        if not hasattr(unet, "set_attn_processor") or not hasattr(unet, "attn_processors"):
            raise UserError(
                f"{type(unet).__name__} is not a diffusers UNet with attention processors: the adapter needs a "
                "UNet2DConditionModel (Stable Diffusion 1.x / 2.x / SDXL)"
            )
        if not any(getattr(m, "is_cross_attention", False) for m in unet.modules()):
            raise UserError(f"{type(unet).__name__} has no cross-attention layer for the adapter to control")
        self.unet = unet
        self.call: AttentionCall | None = None
        self.sample_size: tuple[int, int] | None = None  # (H, W) of the UNet's last input
        self._saved = None
        self._hooks: list = []
        self._stepper = None  # [controller, num_steps, guidance, batch, calls so far] while `sampling`

    @property
    def layers(self) -> list[str]:
        """The names of the cross-attention layers, in the UNet's order."""
        return [name for name, m in self.unet.named_modules() if getattr(m, "is_cross_attention", False)]

    @property
    def installed(self) -> bool:
        return self._saved is not None

    def install(self) -> AttentionAdapter:
        if self.installed:
            return self
        self._saved = dict(self.unet.attn_processors)
        processors = dict(self._saved)
        for name in self.layers:
            key = f"{name}.processor"
            processors[key] = ControlledProcessor(self, name, self._saved[key])
        self.unet.set_attn_processor(processors)
        self._hooks.append(self.unet.register_forward_pre_hook(self._before_call, with_kwargs=True))
        return self

    def remove(self) -> None:
        if not self.installed:
            return
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        self.unet.set_attn_processor(self._saved)
        self._saved = None
        self.call = None

    def __enter__(self) -> AttentionAdapter:
        return self.install()

    def __exit__(self, *exc) -> None:
        self.remove()

    @contextmanager
    def sampling(
        self,
        controller: AttentionController | None,
        num_steps: int | None = None,
        guidance: bool = True,
        batch: int | None = None,
    ):
        """Installs the adapter (if it is not) for a sampling loop: each UNet forward call inside
        is step 0, 1, ... of `num_steps`. Its conditional rows: with `batch` (the number of
        images) the call's last `batch` rows, which are the second half while guidance batches
        the unconditional half first (as diffusers' pipelines do) and every row once a guidance
        cutoff has dropped that half; without it, the second half when `guidance`, else every
        row. controller None: the stock UNet's images."""
        was_installed = self.installed
        self.install()
        self._stepper = [controller, num_steps, guidance, batch, 0]
        try:
            yield self
        finally:
            self._stepper = None
            self.call = None
            if not was_installed:
                self.remove()

    @property
    def steps_taken(self) -> int:
        """UNet calls counted by the current `sampling` block."""
        return self._stepper[4] if self._stepper else 0

    def _before_call(self, module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        self.sample_size = tuple(sample.shape[-2:])
        if self._stepper is not None:
            controller, num_steps, guidance, batch, step = self._stepper
            rows = sample.shape[0]
            if batch is not None:
                conditional = slice(rows - batch, None)
            else:
                conditional = slice(rows // 2, None) if guidance and rows > 1 else slice(None)
            self.call = None if controller is None else AttentionCall(controller, step, num_steps, conditional)
            self._stepper[4] = step + 1
        return None

    def resolution(self, queries: int) -> tuple[int, int]:
        """(h, w) of the feature map with `queries` pixels: the UNet input's size halved (rounding
        up, as a stride-2 convolution with padding 1 does) until it matches."""
        if self.sample_size is None:
            raise RuntimeError("the adapter saw no UNet call: call the UNet itself, not one of its layers")
        h, w = self.sample_size
        while h * w > queries and (h > 1 or w > 1):
            h, w = (h + 1) // 2, (w + 1) // 2
        if h * w != queries:
            raise RuntimeError(f"no feature map of {queries} pixels under an input of {self.sample_size}")
        return h, w


def controlled(unet: nn.Module) -> AttentionAdapter:
    """The adapter of `unet`, made once and kept on the module (so repeated calls share it)."""
    adapter = getattr(unet, "_attention_adapter", None)
    if adapter is None:
        adapter = AttentionAdapter(unet)
        unet._attention_adapter = adapter
    return adapter


def check_supported(transformer_or_unet: nn.Module | str) -> None:
    """One line for the models whose attention this adapter cannot reach yet (SD3, Flux: joint
    attention over image and text tokens in one sequence, in a transformer, not a UNet).
    transformer_or_unet: the denoiser, or its class name (a model folder's model_index.json)."""
    name = transformer_or_unet if isinstance(transformer_or_unet, str) else type(transformer_or_unet).__name__
    if "Transformer" in name and "UNet" not in name:
        raise UserError(
            f"{name} (SD3 / Flux-style joint attention) is not supported yet: the attention tools work on "
            "UNet2DConditionModel pipelines (Stable Diffusion 1.x, 2.x, SDXL)"
        )


__all__ = ["AttentionAdapter", "ControlledProcessor", "attention_probabilities", "check_supported", "controlled"]
