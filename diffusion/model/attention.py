"""Attention layers of the UNet and the hook through which cross-attention maps are read or edited.

Cross-attention: the queries are the UNet's spatial features (B, H*W, C); the keys and values are
the text-token embeddings (B, T, D) projected to C. Each head's probabilities
softmax(Q K^T / sqrt(d)) say, for every pixel, how much of each text token it reads.

The hook is an `AttentionController` handed to the UNet's forward call (no monkeypatching, no
global state). For every cross-attention layer the UNet asks `controller.wants(site)`; only if it
answers True are the probabilities materialised and passed to `controller.process(site, probs)`,
which may return edited probabilities; if it returns None (it only read them) outside training,
the output still comes from `attend`, so an image is the same with or without recording.
Otherwise the layer goes through `attend`: the fused `scaled_dot_product_attention`, or plain
ops over batch slices when training on CPU. A controller that can also act on a compiled UNet
(the editor's, diffusion/editor/compiled.py) says what it needs there with `graph_request`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import get_2d_sincos_pos_embed
from torch import nn


@dataclass(frozen=True)
class AttentionSite:
    """Where a cross-attention call happens.

    name: the layer's name in the UNet, e.g. "down.1.attn.0" (stable across runs).
    resolution: (height, width) of the feature map whose pixels are the queries.
    step: the sampler's step index (0 = first denoising step) or None outside sampling.
    num_steps: the sampler's number of steps, or None outside sampling.
    conditional: the rows of the batch that are conditioned on the prompt (at a step with
        classifier-free guidance the unconditional half comes first and this is the second half;
        past the guidance cutoff, or at guidance 1, every row).
    """

    name: str
    resolution: tuple[int, int]
    step: int | None = None
    num_steps: int | None = None
    conditional: slice = field(default_factory=lambda: slice(None))


@dataclass(frozen=True)
class AttentionCall:
    """What one UNet forward call tells every cross-attention site (see AttentionSite)."""

    controller: AttentionController
    step: int | None = None
    num_steps: int | None = None
    conditional: slice = field(default_factory=lambda: slice(None))


@dataclass(frozen=True)
class GraphRequest:
    """What a controller needs from a UNet call that runs as a compiled graph
    (`AttentionController.graph_request`). Tensors and flags only: a graph that read a
    controller's Python state would be rebuilt at every step (diffusion/editor/compiled.py).

    weights: (B, T) per-token weights of the conditional rows, applied inside the graph as
        `AttentionReweighter` applies them (None: no reweighting at this call).
    resolutions: the feature-map sides the weights act at (None: all).
    recorders: the controllers that read the maps: after the call, each one's `process` is given
        every site it `wants`, with the conditional rows' mean over heads as one head,
        (B, 1, H*W, T). Named one by one, not as a flag, because a chain's other members (a
        reweighter) must not see the maps again.
    """

    weights: torch.Tensor | None = None
    resolutions: frozenset[int] | None = None
    recorders: tuple[AttentionController, ...] = ()

    @property
    def record(self) -> bool:
        """Whether the graph returns the maps."""
        return bool(self.recorders)


class AttentionController:
    """Reads or edits cross-attention probabilities. Subclass it; this base does nothing.

    wants(site) -> bool: whether this call's probabilities are needed. Answer False wherever you
        can: a False keeps the layer on `attend`, which never materialises them when sampling.
    process(site, probabilities) -> Tensor | None: `probabilities` has shape
        (B, heads, H*W, T) and sums to 1 over T at every query (masked keys hold 0). Return an
        edited tensor of the same shape to use it in place of the original, or None to keep it.
    graph_request(step, num_steps) -> GraphRequest | None: what this controller needs from the
        UNet call at sampling step `step` of `num_steps` if it ran as a compiled graph, or None
        (this base) when it cannot run inside one, so that call runs on the eager UNet.
    """

    def wants(self, site: AttentionSite) -> bool:
        return False

    def process(self, site: AttentionSite, probabilities: torch.Tensor) -> torch.Tensor | None:
        return None

    def graph_request(self, step: int | None, num_steps: int | None) -> GraphRequest | None:
        return None


CPU_CHUNK = 2**21  # attention scores computed at once on CPU (4 MiB in bf16): they stay in cache


def attention_probabilities(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) in plain ops: (B, heads, N, T), masked keys 0. Shapes as in `attend`."""
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(dim=-1)


def sliced_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None, chunk: int = CPU_CHUNK
) -> torch.Tensor:
    """`attention_probabilities` @ v over slices of the batch whose scores hold at most `chunk`
    numbers. Shapes as in `attend`."""
    B, heads, N, _ = q.shape
    rows = max(1, chunk // (heads * N * k.shape[2]))
    outputs = []
    for i in range(0, B, rows):
        rows_mask = None if mask is None else mask if mask.shape[0] == 1 else mask[i : i + rows]
        outputs.append(attention_probabilities(q[i : i + rows], k[i : i + rows], rows_mask) @ v[i : i + rows])
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v for (B, heads, N, d) queries and (B, heads, T, d) keys/values;
    mask: (B or 1, 1, 1, T) bool, True where a key may be read.

    Training on CPU (queries that need a gradient): `sliced_attention`. At this model's sizes
    (16 px self-attention: 256 queries of width 16) the fused kernel's backward is slow, and
    unsliced scores fall out of cache. Everywhere else the fused kernel, which never materialises
    the probabilities."""
    if q.device.type == "cpu" and q.requires_grad:
        return sliced_attention(q, k, v, mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class SelfAttention(nn.Module):
    """Multi-head self-attention over spatial positions."""

    def __init__(self, channels: int, heads: int):
        super().__init__()
        self.heads = heads
        self.to_qkv = nn.Linear(channels, 3 * channels, bias=False)
        self.to_out = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape  # batch, positions (H*W), channels
        q, k, v = self.to_qkv(x).view(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        out = attend(q, k, v)  # (B, heads, N, C/heads)
        return self.to_out(out.transpose(1, 2).reshape(B, N, C))


class CrossAttention(nn.Module):
    """Multi-head cross-attention: queries from pixels, keys and values from text tokens."""

    def __init__(self, channels: int, context_dim: int, heads: int, name: str, value_start: int = 0):
        """value_start: the values read only the context's features from this index on (0: all)."""
        super().__init__()
        if not 0 <= value_start < context_dim:
            raise ValueError(f"value_start must be in [0, {context_dim}), got {value_start}")
        self.heads = heads
        self.name = name
        self.value_start = value_start
        self.to_q = nn.Linear(channels, channels, bias=False)
        self.to_k = nn.Linear(context_dim, channels, bias=False)
        self.to_v = nn.Linear(context_dim - value_start, channels, bias=False)
        self.to_out = nn.Linear(channels, channels)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor,
        context_mask: torch.Tensor | None,
        resolution: tuple[int, int],
        call: AttentionCall | None = None,
    ) -> torch.Tensor:
        """x: (B, H*W, C) pixel features; context: (B, T, D) text embeddings;
        context_mask: (B, T) bool, True where a token may be attended to (None: all);
        call: the controller and step of this forward call, if any."""
        B, N, C = x.shape
        T = context.shape[1]
        d = C // self.heads
        q = self.to_q(x).view(B, N, self.heads, d).transpose(1, 2)  # (B, heads, N, d)
        k = self.to_k(context).view(B, T, self.heads, d).transpose(1, 2)  # (B, heads, T, d)
        v = self.to_v(context[..., self.value_start :]).view(B, T, self.heads, d).transpose(1, 2)  # (B, heads, T, d)
        mask = None if context_mask is None else context_mask[:, None, None, :]  # (B, 1, 1, T)

        site = None
        if call is not None:
            site = AttentionSite(self.name, resolution, call.step, call.num_steps, call.conditional)
        if site is None or not call.controller.wants(site):
            out = attend(q, k, v, mask)
        else:
            probabilities = attention_probabilities(q, k, mask)  # (B, heads, N, T)
            edited = call.controller.process(site, probabilities)
            if edited is None and not q.requires_grad:
                # Sampling with a controller that only reads: the output still comes from
                # `attend`, so recording maps never changes the image (plain ops round
                # differently from the fused kernel). Training (the grounding loss) reuses the
                # probabilities it already has.
                out = attend(q, k, v, mask)
            else:
                out = (probabilities if edited is None else edited.to(v.dtype)) @ v
        return self.to_out(out.transpose(1, 2).reshape(B, N, C))


class TransformerBlock(nn.Module):
    """Self-attention over positions, cross-attention to the text, then a feed-forward layer,
    each pre-normed and residual, between 1x1 projections in and out of the feature map.

    position_grid: if set (the side of the feature map), a fixed 2D sine-cosine position embedding
    (as in ViT/DiT) is added to the features after the input projection, so queries know where
    they are: convolutions alone only learn it from the zero padding at the borders."""

    def __init__(
        self,
        channels: int,
        context_dim: int,
        heads: int,
        name: str,
        groups: int = 8,
        position_grid: int | None = None,
        value_start: int = 0,
    ):
        super().__init__()
        position = None
        if position_grid:
            position = get_2d_sincos_pos_embed(
                channels, position_grid, base_size=position_grid, output_type="pt"
            ).float()[None]  # (1, side*side, C)
        self.register_buffer("position", position, persistent=False)
        self.norm = nn.GroupNorm(groups, channels)
        self.proj_in = nn.Linear(channels, channels)
        self.norm1 = nn.LayerNorm(channels)
        self.self_attention = SelfAttention(channels, heads)
        self.norm2 = nn.LayerNorm(channels)
        self.cross_attention = CrossAttention(channels, context_dim, heads, name, value_start)
        self.norm3 = nn.LayerNorm(channels)
        self.feed_forward = nn.Sequential(
            nn.Linear(channels, 4 * channels), nn.GELU(), nn.Linear(4 * channels, channels)
        )
        self.proj_out = nn.Linear(channels, channels)
        nn.init.zeros_(self.proj_out.weight)  # start as the identity, as diffusers' models do
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x, context, context_mask, call: AttentionCall | None = None):
        B, C, H, W = x.shape
        h = self.proj_in(self.norm(x).flatten(2).transpose(1, 2))  # (B, H*W, C)
        if self.position is not None:
            h = h + self.position.to(h.dtype)
        h = h + self.self_attention(self.norm1(h))
        h = h + self.cross_attention(self.norm2(h), context, context_mask, (H, W), call)
        h = h + self.feed_forward(self.norm3(h))
        return x + self.proj_out(h).transpose(1, 2).reshape(B, C, H, W)
