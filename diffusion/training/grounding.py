"""Token-level grounding loss on the cross-attention maps (after TokenCompose, Wang et al. 2024).

Why: with a frozen CLIP, a UNet can draw every prompt right while its per-word maps point
anywhere, because later tokens of a causal encoder summarise the caption and the UNet reads
what it needs from them. Where the data has object masks (the shapes set, an image folder whose
metadata names a mask per image), this loss asks each colour and shape word (a folder's caption:
each of its words, `caption_targets`) to put its attention on its own object:

    for every colour/shape token t naming object k, at every grounded layer:
        share_t = sum_p A[p, t] * M_k[p] / sum_p A[p, t]      A: head-averaged probabilities
        loss   += (1 - share_t)^2                             M_k: object mask at that layer's size

averaged over tokens and layers, and added to the denoising loss with weight
`train.grounding_weight`. The token loss asks for the word's attention to be *inside* its object;
a map that sits on the object's centre satisfies it. TokenCompose's pixel loss also asks it to
*cover* the object: per pixel, binary cross-entropy between the token's attention probability
and the mask,

        pixel += mean_p BCE(A[p, t], M_k[p])

averaged the same way, weighted by `train.grounding_pixel_weight` (0: not computed). It runs
through the same `AttentionController` hook as map recording.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from diffusion.data.shapes import Scene
from diffusion.model.attention import AttentionController, AttentionSite


def grounding_targets(scenes: list[Scene], offsets_of) -> torch.Tensor:
    """Which object each token of every sample's caption names.

    scenes: the samples' scenes (`ShapesDataset.render_with_masks`, which also gives the masks).
    offsets_of: a function captions -> (B, T, 2) token character offsets (TextEncoder.tokenize).
    Returns token_object (N, T) int8: object index, -1 for tokens that name no colour or shape."""
    N = len(scenes)
    token_object = None
    for start in range(0, N, 1024):
        chunk = scenes[start : start + 1024]
        offsets = offsets_of([s.caption for s in chunk])  # (b, T, 2)
        if token_object is None:
            token_object = torch.full((N, offsets.shape[1]), -1, dtype=torch.int8)
        begin, end = offsets[..., 0], offsets[..., 1]  # (b, T)
        for row, scene in enumerate(chunk):
            for k, spans in enumerate(zip(scene.colour_spans, scene.shape_spans)):
                for s, e in filter(None, spans):  # a word the caption leaves out grounds nothing
                    overlaps = (begin[row] < e) & (end[row] > s) & (end[row] > begin[row])
                    token_object[start + row, overlaps] = k
    return token_object


def caption_targets(captions: list[str], offsets_of) -> torch.Tensor:
    """Which object each token of one-object captions names: every token of a caption's text
    (an image folder's caption names the one thing its image shows, "red apple") names object 0,
    the image's foreground mask; start, end and padding tokens name none.

    captions: N distinct captions; offsets_of: as for `grounding_targets`.
    Returns token_object (N, T) int8: 0, or -1 for tokens that name nothing."""
    chunks = []
    for start in range(0, len(captions), 1024):
        offsets = offsets_of(captions[start : start + 1024])  # (b, T, 2); (0, 0) for special tokens
        chunks.append(torch.where(offsets[..., 1] > offsets[..., 0], 0, -1).to(torch.int8))
    return torch.cat(chunks)


class GroundingLoss(AttentionController):
    """Collects the grounding loss of one training forward pass (see module docstring).

    resolutions: feature-map sides whose cross-attention layers are grounded; pixel: also
    collect the pixel loss."""

    def __init__(self, resolutions: set[int], pixel: bool = False):
        self.resolutions = set(resolutions)
        self.pixel = pixel
        self.masks: torch.Tensor | None = None
        self.terms: list[torch.Tensor] = []
        self.pixel_terms: list[torch.Tensor] = []

    def set_batch(self, token_object: torch.Tensor, masks: torch.Tensor) -> None:
        """token_object: (B, T) long, -1 for ungrounded tokens (and for dropped captions);
        masks: (B, K, R, R) float object masks of the batch."""
        # Only the grounded tokens are looked at (a few of the T per caption): the loss reads
        # their maps alone, so its forward and backward skip the other tokens' probabilities.
        self.rows, self.tokens = (token_object >= 0).nonzero(as_tuple=True)  # (M,), (M,)
        self.objects = token_object[self.rows, self.tokens].long()  # (M,)
        self.masks, self.terms, self.pixel_terms = masks, [], []
        self.pooled: dict[tuple[int, int], torch.Tensor] = {}

    def wants(self, site: AttentionSite) -> bool:
        return site.resolution[0] in self.resolutions

    def process(self, site: AttentionSite, probabilities: torch.Tensor) -> None:
        h, w = site.resolution
        if (h, w) not in self.pooled:  # (B, K, h*w), soft at low resolution; once per size and batch
            self.pooled[h, w] = F.adaptive_avg_pool2d(self.masks, (h, w)).flatten(2)
        # (M, heads, h*w) -> (M, h*w): each grounded token's head-averaged map
        attention = probabilities[self.rows, :, :, self.tokens].float().mean(1)
        token_masks = self.pooled[h, w][self.rows, self.objects]  # (M, h*w): the mask of each token's object
        count = max(len(self.rows), 1)
        share = (attention * token_masks).sum(-1) / attention.sum(-1).clamp_min(1e-8)  # (M,)
        self.terms.append(((1 - share) ** 2).sum() / count)
        if self.pixel:
            # A NaN map (diverged weights) would make binary_cross_entropy raise; the NaN is in the
            # denoising loss anyway, where the training loop stops on it with the step named.
            probability = attention.nan_to_num(0.5).clamp(1e-6, 1 - 1e-6)
            bce = F.binary_cross_entropy(probability, token_masks, reduction="none").mean(-1)
            self.pixel_terms.append(bce.sum() / count)
        return None

    def loss(self) -> torch.Tensor:
        """The token loss: the mean over the grounded layers of this forward pass."""
        return torch.stack(self.terms).mean()

    def pixel_loss(self) -> torch.Tensor:
        """The pixel loss (with `pixel`): the mean over the grounded layers of this forward pass."""
        return torch.stack(self.pixel_terms).mean()
