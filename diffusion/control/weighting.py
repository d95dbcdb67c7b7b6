"""What a prompt's word weights do: `(red:2)` in a prompt, applied to what the UNet reads.

Two modes. "attention" (the default) reweights the word's cross-attention probabilities and
renormalises them (`attention_control.AttentionReweighter`): at weight 0 no pixel reads the word,
above 1 pixels read it more and the other words less. "embedding" scales the word's text state
from the empty prompt's, e0 + w (e - e0) (compel / AUTOMATIC1111 style), by default for the first
0.3 of the steps only (`Weighting.window`, config.DEFAULT_WEIGHT_STEPS).

In both, a word weighted below 1 can also fade out of the other words' text states (context
"fade", the default): the causal CLIP writes "red" into the state of "circle" in "a red circle",
so removing the attention to "red" alone leaves the colour in the picture.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffusion.config import DEFAULT_WEIGHT_STEPS, WEIGHT_CONTEXTS, WEIGHT_MODES
from diffusion.control.prompts import WeightedPrompt, align_tokens, delete_tokens, word_token_weights
from diffusion.errors import UserError
from diffusion.model.text_encoder import TextEncoder


@dataclass
class Weighting:
    """How prompt weights act. mode "attention" or "embedding" (module docstring), within
    `steps`, a [start, end) fraction of the sampling steps (None: the mode's default,
    config.DEFAULT_WEIGHT_STEPS; `window`), and at `resolutions`, the feature-map sides (None:
    all), which also limit a word swap's injection. context "fade": a word weighted below 1 also
    fades out of the other tokens' text states (`condition`); "keep": those states stay as
    encoded (plain Prompt-to-Prompt reweighting or embedding scaling).

    Outside the window the UNet reads the plain states, except that in embedding mode a word at
    weight 0 stays deleted at every step: that weight means the prompt without the word, which
    the model would otherwise draw back in the steps after the window."""

    mode: str = WEIGHT_MODES[0]  # "attention"
    steps: tuple[float, float] | None = None
    resolutions: set[int] | None = None
    context: str = WEIGHT_CONTEXTS[0]  # "fade"

    @property
    def window(self) -> tuple[float, float]:
        """The [start, end) fraction of the steps in which the weights act."""
        return tuple(self.steps) if self.steps is not None else DEFAULT_WEIGHT_STEPS.get(self.mode, (0.0, 1.0))

    def check(self) -> None:
        if self.mode not in WEIGHT_MODES:
            raise UserError(f"unknown weight mode '{self.mode}'; choose {' or '.join(WEIGHT_MODES)}")
        if self.context not in WEIGHT_CONTEXTS:
            raise UserError(f"unknown weight context '{self.context}'; choose {' or '.join(WEIGHT_CONTEXTS)}")
        start, end = self.window
        if not (0 <= start < end <= 1):
            raise UserError(f"weight steps must be a window 0 <= start < end <= 1, got {start},{end}")

    def acts_within_window(self) -> bool:
        """Whether the weighted states apply only within `window`: outside it the UNet reads the
        states of `outside_weights`. Attention mode with "fade" (the faded states follow the
        reweighting's window) and embedding mode, whenever the window is not every step."""
        everywhere = self.window == (0.0, 1.0)
        return not everywhere and (self.mode == "embedding" or self.context == "fade")

    def outside_weights(self, weights: torch.Tensor) -> torch.Tensor:
        """(B, T) the token weights that act outside the window: none (all 1), but in embedding
        mode a word at 0 stays at 0."""
        if self.mode == "embedding":
            return torch.where(weights == 0, 0.0, 1.0).to(weights.dtype)
        return torch.ones_like(weights)


def token_weights(prompts: list[WeightedPrompt], offsets: torch.Tensor) -> torch.Tensor:
    """(B, T) the weight of every token of each prompt (offsets: (B, T, 2) of the plain texts)."""
    T = offsets.shape[1]
    return torch.stack([word_token_weights(p, o, T) for p, o in zip(prompts, offsets)])


def condition(
    encoder: TextEncoder,
    prompts: list[str],
    weights: torch.Tensor | None,
    weighting: Weighting,
    encoded: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The text states (B, T, D) the UNet attends to for `prompts` and their key mask (B, T),
    under per-token `weights` (B, T) (None: the plain encoding). encoded: the plain encoding of
    `prompts` when the caller already has it.

    With context "fade", a word weighted below 1 fades out of the other tokens' states: they
    become e_without + s (e - e_without), where e_without is the encoding of the prompt with the
    down-weighted words deleted (token by token aligned back onto this prompt) and s is the
    prompt's smallest weight. The weighted tokens' own states are left to the mode.
    In embedding mode a weighted token's own state moves from the empty prompt's,
    e0 + w (e - e0), and with "fade" a word at weight 0 is no longer a key either, so weight 0
    gives exactly the prompt with the word deleted (as compel's down-weighting does). In attention
    mode the states are only faded; the controller reweights the probabilities."""
    embeddings, key_mask = encoded if encoded is not None else encoder.encode(prompts)
    if weights is None or bool((weights == 1).all()):
        return embeddings, key_mask
    weights = weights.to(embeddings.device)
    down = weights < 1  # (B, T)
    fade = weighting.context == "fade" and bool(down.any())
    if fade:
        T, D = embeddings.shape[1:]
        offsets = encoder.offsets(prompts)
        deleted = [delete_tokens(p, o, d) for p, o, d in zip(prompts, offsets, down.tolist())]
        without, _ = encoder.encode(deleted)
        # where each of this prompt's tokens sits in the deleted prompt (-1: a deleted word)
        mapping = torch.stack(
            [
                align_tokens(o_without, text_without, o, p, T)
                for o_without, text_without, o, p in zip(encoder.offsets(deleted), deleted, offsets, prompts)
            ]
        ).to(embeddings.device)
        without = torch.gather(without, 1, mapping.clamp(min=0)[:, :, None].expand(-1, -1, D))
        without = torch.where((mapping >= 0)[:, :, None], without, embeddings)
        scale = weights.masked_fill(~down, 1.0).amin(dim=1)[:, None, None]  # (B, 1, 1)
        context = without + scale * (embeddings - without)
        embeddings = torch.where(down[:, :, None], embeddings, context)
    if weighting.mode == "embedding":
        if fade:
            key_mask = key_mask & (weights != 0)
        empty, _ = encoder.encode([""])
        embeddings = empty + weights[:, :, None] * (embeddings - empty)
    return embeddings, key_mask
