"""A word swap's plan (Prompt-to-Prompt): which source token each edit token takes its maps from,
which tokens change, and which keep the source's maps at every step.

`Pipeline.swap` draws the source and the edit from the same noise; `AttentionInjector` gives the
edit the source's maps through this plan's `mapping` for the first edit steps, and at every step
for the tokens in `keep` (the layout kept: the outlines stay and only the swapped word's thing
changes); `LocalBlend` reads `changed`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffusion.control.controllers import changed_tokens
from diffusion.control.prompts import WeightedPrompt, align_tokens, object_phrase, parse_prompt, swap_kind


@dataclass
class SwapPlan:
    """How a word swap acts on P (source, edit) pairs (`Pipeline.swap_plan`)."""

    prompts: list[WeightedPrompt]  # 2P: source and edit of each pair in turn
    mapping: torch.Tensor  # (P, T) the source token each edit token takes its maps from (-1: none)
    changed: torch.Tensor  # (2P, T) the tokens the swap changes (`changed_tokens`)
    keep: torch.Tensor  # (P, T) the edit tokens that keep the source's maps at every step
    layouts: list[str]  # each pair's: "on", "off" or "redraw object" (`SamplingSettings.keep_layout`)

    def repeat(self, count: int) -> SwapPlan:
        """The plan of `count` copies of this one pair (P = 1)."""
        rows = [k for _ in range(count) for k in range(2)]
        return SwapPlan(
            [self.prompts[k] for k in rows],
            self.mapping.repeat(count, 1),
            self.changed[rows],
            self.keep.repeat(count, 1),
            self.layouts * count,
        )


def plan_swaps(
    encoder, pairs: list[tuple[WeightedPrompt | str, WeightedPrompt | str]], keep_layout: bool | None = None
) -> SwapPlan:
    """How a word swap acts on each (source, edit) pair, with `encoder`'s tokens (a TextEncoder).
    keep_layout: as `SamplingSettings.keep_layout` (None: by `swap_kind`)."""
    parsed = [p if isinstance(p, WeightedPrompt) else parse_prompt(p) for pair in pairs for p in pair]
    texts = [p.text for p in parsed]
    offsets = encoder.offsets(texts)  # (2P, T, 2)
    T = offsets.shape[1]
    mapping = torch.stack(
        [align_tokens(offsets[2 * k], texts[2 * k], offsets[2 * k + 1], texts[2 * k + 1], T) for k in range(len(pairs))]
    )  # (P, T)
    changed = changed_tokens(encoder.token_ids(texts), offsets, mapping)
    keep = torch.zeros_like(mapping, dtype=torch.bool)
    layouts = []
    for k in range(len(pairs)):
        source, edit = 2 * k, 2 * k + 1
        kind = None
        if keep_layout is None:
            kind = swap_kind(texts[source], offsets[source], changed[source], texts[edit], offsets[edit], changed[edit])
        if keep_layout or kind == "recolour":
            keep[k] = ~changed[edit]
            layouts.append("on")
        elif kind == "resize":
            # the source's maps hold the object's old outline: its words draw it anew from the
            # first step, and every other word keeps the source's maps at every step
            redrawn = torch.tensor(object_phrase(texts[edit], offsets[edit], changed[edit])) | changed[edit]
            mapping[k, redrawn] = -1
            keep[k] = ~redrawn
            layouts.append("redraw object")
        else:
            layouts.append("off")
    return SwapPlan(parsed, mapping, changed, keep, layouts)
