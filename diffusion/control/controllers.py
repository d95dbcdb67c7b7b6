"""Attention controllers: record per-token cross-attention maps, reweight tokens, inject maps.

All of them plug into the UNet through `AttentionController` (attention.py) and act on the
conditional rows of the batch only (`site.conditional`); the unconditional half of
classifier-free guidance is left alone, as in Prompt-to-Prompt.

- `AttentionRecorder` keeps running sums (DAAM-style aggregation): mean over heads, sum over the
  layers at the chosen resolutions (upsampled bilinearly to a common size when read) and over a
  window of steps. Memory is O(batch x tokens x size^2), whatever the number of steps, layers or heads.
  Per-step history only when asked for.
- `AttentionReweighter` multiplies the probabilities of weighted tokens by their weights and
  renormalises them (Prompt-to-Prompt's reweighting, which leaves P * w unnormalised, then
  divided by its sum): a weight moves attention between the words. At 0 a pixel no longer reads
  the word at all, as if its key were masked; above 1 it reads it more and the others less.
- `AttentionInjector` replaces the edited prompt's maps by the source prompt's for the first
  steps (Prompt-to-Prompt's word swap and refinement), through a token alignment; the words a
  swap keeps may keep the source's maps at every step, which keeps the outlines.
- `LocalBlend` (Prompt-to-Prompt's local blend) records the changed words' maps of a word swap
  and, after every sampling step, puts the source's pixels back into the edit wherever those
  maps are weak, so the edit changes only where the changed words act.
- `ControllerChain` runs several; edits happen before recording, so the recorded maps are the
  ones the model used.

The recorder, the reweighter and a chain of them also run inside a compiled UNet
(`graph_request`); the others keep a UNet call on the eager one.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F

from diffusion.model.attention import AttentionController, AttentionSite, GraphRequest


def step_in_window(step: int, num_steps: int, window: tuple[float, float]) -> bool:
    """Whether step `step` of `num_steps` lies in `window`, a [start, end) fraction of the steps."""
    return window[0] <= step / num_steps < window[1]


def in_window(site: AttentionSite, window: tuple[float, float]) -> bool:
    """Whether the site's step lies in `window` (see `step_in_window`). Calls outside sampling
    (no step) are always in."""
    if site.step is None or not site.num_steps:
        return True
    return step_in_window(site.step, site.num_steps, window)


class SiteFilter:
    """Which cross-attention calls a controller acts on: a window of steps, a set of resolutions."""

    def __init__(self, steps: tuple[float, float] = (0.0, 1.0), resolutions: set[int] | None = None):
        self.steps = steps
        self.resolutions = set(resolutions) if resolutions else None

    def __call__(self, site: AttentionSite) -> bool:
        if self.resolutions is not None and site.resolution[0] not in self.resolutions:
            return False
        return in_window(site, self.steps)

    def at_step(self, step: int | None, num_steps: int | None) -> bool:
        """Whether sampling step `step` of `num_steps` lies in the window (always outside sampling)."""
        return in_window(AttentionSite("", (0, 0), step, num_steps), self.steps)


class AttentionRecorder(AttentionController):
    """Aggregated per-token maps of the conditional rows.

    size: side of the common grid the maps are upsampled to (e.g. the image side), or its
        (height, width).
    steps, resolutions: which calls to record (see SiteFilter).
    keep_history: also keep one aggregate per step (memory grows with the steps).

    The sums are kept per resolution at the layers' own sides and upsampled when read (`total`,
    `history`): bilinear upsampling is linear, so the sum of the upsampled maps is the upsampled
    sum, and a call costs an addition instead of an interpolation.
    """

    def __init__(
        self,
        size: int | tuple[int, int],
        steps: tuple[float, float] = (0.0, 1.0),
        resolutions: set[int] | None = None,
        keep_history: bool = False,
    ):
        self.shape = (size, size) if isinstance(size, int) else tuple(size)  # (height, width)
        self.filter = SiteFilter(steps, resolutions)
        self.keep_history = keep_history
        self.calls = 0
        self._sums: dict[tuple[int, int], torch.Tensor] = {}  # resolution -> (B, T, h, w) running sum
        self._step_sums: dict[int, dict[tuple[int, int], torch.Tensor]] = {}  # step -> the same, that step only
        self._total: torch.Tensor | None = None  # upsampled `_sums`, until the next call
        self._history: dict[int, torch.Tensor] | None = None

    def wants(self, site: AttentionSite) -> bool:
        return self.filter(site)

    def process(self, site: AttentionSite, probabilities: torch.Tensor) -> None:
        conditional = probabilities[site.conditional].float()  # (B, heads, H*W, T)
        B, _, _, T = conditional.shape
        h, w = site.resolution
        maps = conditional.mean(1).transpose(1, 2).reshape(B, T, h, w)  # (B, T, h, w)
        _accumulate(self._sums, (h, w), maps)
        self.calls += 1
        if self.keep_history and site.step is not None:
            _accumulate(self._step_sums.setdefault(site.step, {}), (h, w), maps)
        self._total = self._history = None
        return None

    def graph_request(self, step: int | None, num_steps: int | None) -> GraphRequest | None:
        """Recorded from a compiled graph: `process` then gets each site's mean over heads (one
        head), which is all it reads. A subclass with its own `process` may need the heads: eager."""
        return GraphRequest(recorders=(self,)) if type(self).process is AttentionRecorder.process else None

    def _upsampled(self, maps: torch.Tensor) -> torch.Tensor:
        """(N, T, h, w) -> (N, T, height, width); bilinear weights sum to one, so maps that sum to
        1 over tokens still do at every position."""
        if maps.shape[-2:] == self.shape:
            return maps
        return F.interpolate(maps, size=self.shape, mode="bilinear", align_corners=False)

    @property
    def total(self) -> torch.Tensor | None:
        """(B, T, height, width): the sum of every recorded call's maps (None before the first)."""
        if self._total is None and self._sums:
            for maps in self._sums.values():
                up = self._upsampled(maps)
                self._total = up if self._total is None else self._total + up
        return self._total

    @property
    def history(self) -> dict[int, torch.Tensor]:
        """step -> (B, T, height, width): the sum of that step's maps (empty without keep_history).
        Each resolution's steps are upsampled in one call."""
        if self._history is None:
            steps = sorted(self._step_sums)
            stacked = None
            for resolution in {r for sums in self._step_sums.values() for r in sums}:
                like = next(sums[resolution] for sums in self._step_sums.values() if resolution in sums)
                per_step = torch.stack([self._step_sums[s].get(resolution, torch.zeros_like(like)) for s in steps])
                up = self._upsampled(per_step.flatten(0, 1)).unflatten(0, per_step.shape[:2])  # (S, B, T, R, R)
                stacked = up if stacked is None else stacked + up
            self._history = {} if stacked is None else dict(zip(steps, stacked.unbind(0)))
        return self._history

    def token_maps(self) -> torch.Tensor:
        """(B, T, height, width): the mean map of every token over the recorded calls."""
        if self.total is None:
            raise RuntimeError("no cross-attention was recorded (check the step window and resolutions)")
        return self.total / self.calls


def _accumulate(sums: dict, key, maps: torch.Tensor) -> None:
    sums[key] = maps if key not in sums else sums[key] + maps


class AttentionReweighter(AttentionController):
    """Reweight each conditional row's tokens: P[b, :, :, t] * weights[b, t], renormalised over t.

    The probabilities still sum to 1 at every pixel, so the layer's output stays a mix of the
    values it was trained on: scaled without renormalising (as Prompt-to-Prompt does), a weight
    of 2 or 4 makes pixels that barely read the word read much more text than ever in training,
    which shows as coloured grain over the background, and a weight of 0 leaves pixels reading
    less text than they expect, which thins the object out.

    weights: (B, T) one weight per token of each conditional row (1 = unchanged)."""

    def __init__(
        self, weights: torch.Tensor, steps: tuple[float, float] = (0.0, 1.0), resolutions: set[int] | None = None
    ):
        self.weights = weights
        self.filter = SiteFilter(steps, resolutions)

    def wants(self, site: AttentionSite) -> bool:
        return self.filter(site)

    def process(self, site: AttentionSite, probabilities: torch.Tensor) -> torch.Tensor:
        edited = probabilities.clone()
        weights = self.weights.to(probabilities.device, probabilities.dtype)
        scaled = probabilities[site.conditional] * weights[:, None, None, :]  # (B, heads, N, T)
        edited[site.conditional] = scaled / scaled.sum(-1, keepdim=True).clamp_min(torch.finfo(scaled.dtype).tiny)
        return edited

    def graph_request(self, step: int | None, num_steps: int | None) -> GraphRequest | None:
        """The weights (outside the window of steps: none) and resolutions, for the graph to apply
        as `process` does. A subclass with its own `process` edits otherwise: eager."""
        if type(self).process is not AttentionReweighter.process:
            return None
        if not self.filter.at_step(step, num_steps):
            return GraphRequest()
        resolutions = None if self.filter.resolutions is None else frozenset(self.filter.resolutions)
        return GraphRequest(weights=self.weights, resolutions=resolutions)


class AttentionInjector(AttentionController):
    """Prompt-to-Prompt word swap: the conditional rows come in (source, edit) pairs; during the
    first `fraction` of the steps, each edit token j takes the source's map of token
    mapping[j] (mapping[j] = -1 keeps the edit's own map, e.g. for an added word).

    mapping: (P, T) long, one row per pair. keep: (P, T) bool or None, edit tokens that take the
    source's map at every step, not only in the first `fraction` (a swap that keeps the layout:
    the other words hold the outlines while the swapped word changes what is inside them)."""

    def __init__(
        self,
        mapping: torch.Tensor,
        fraction: float,
        resolutions: set[int] | None = None,
        keep: torch.Tensor | None = None,
    ):
        self.mapping = mapping
        self.fraction = fraction
        self.kept_mapping = mapping.masked_fill(~keep, -1) if keep is not None and bool(keep.any()) else None
        self.filter = SiteFilter((0.0, fraction if self.kept_mapping is None else 1.0), resolutions)

    def wants(self, site: AttentionSite) -> bool:
        return (self.fraction > 0 or self.kept_mapping is not None) and self.filter(site)

    def process(self, site: AttentionSite, probabilities: torch.Tensor) -> torch.Tensor:
        early = self.fraction > 0 and in_window(site, (0.0, self.fraction))
        mapping = (self.mapping if early else self.kept_mapping).to(probabilities.device)  # (P, T)
        edited = probabilities.clone()
        conditional = probabilities[site.conditional]  # (2P, heads, N, T)
        source, target = conditional[0::2], conditional[1::2]  # (P, heads, N, T) each
        gathered = torch.gather(source, 3, mapping.clamp(min=0)[:, None, None, :].expand_as(target))
        injected = torch.where((mapping >= 0)[:, None, None, :], gathered, target)
        rows = torch.arange(probabilities.shape[0], device=probabilities.device)[site.conditional][1::2]
        edited[rows] = injected
        return edited


class ControllerChain(AttentionController):
    """Run several controllers in order; each sees the previous one's output."""

    def __init__(self, controllers: list[AttentionController]):
        self.controllers = [c for c in controllers if c is not None]

    def wants(self, site: AttentionSite) -> bool:
        return any(c.wants(site) for c in self.controllers)

    def process(self, site: AttentionSite, probabilities: torch.Tensor) -> torch.Tensor | None:
        edited = None
        for controller in self.controllers:
            if controller.wants(site):
                result = controller.process(site, probabilities if edited is None else edited)
                edited = result if result is not None else edited
        return edited

    def graph_request(self, step: int | None, num_steps: int | None) -> GraphRequest | None:
        """The members' requests merged: None if any member cannot run in a graph, or if more than
        one brings weights (the graph applies one set); every member's recorders."""
        requests = [c.graph_request(step, num_steps) for c in self.controllers]
        if any(request is None for request in requests):
            return None
        weighted = [request for request in requests if request.weights is not None]
        if len(weighted) > 1:
            return None
        recorders = tuple(recorder for request in requests for recorder in request.recorders)
        return replace(weighted[0] if weighted else GraphRequest(), recorders=recorders)


def changed_tokens(input_ids: torch.Tensor, offsets: torch.Tensor, mapping: torch.Tensor) -> torch.Tensor:
    """Which tokens a word swap changes, in both prompts of each pair.

    input_ids: (2P, T) token ids, source and edit of each pair in turn; offsets: (2P, T, 2) their
    character spans; mapping: (P, T) the edit's token j -> the source token it takes the map of
    (`prompts.align_tokens`; -1 for none). An edit token is changed when it is a real token
    whose mapped source token has another id, or none (an added word); a source token is changed
    when a changed edit token maps to it, or no edit token does (a deleted word). Returns (2P, T) bool."""
    P, T = mapping.shape
    changed = torch.zeros(2 * P, T, dtype=torch.bool)
    real = offsets[..., 1] > offsets[..., 0]  # (2P, T): start, end and padding tokens have empty spans
    for k in range(P):
        source_ids, edit_ids = input_ids[2 * k], input_ids[2 * k + 1]
        kept = set()
        for j in range(T):
            if not real[2 * k + 1, j]:
                continue
            i = int(mapping[k, j])
            if i < 0 or source_ids[i] != edit_ids[j]:
                changed[2 * k + 1, j] = True
                if i >= 0:
                    changed[2 * k, i] = True
            else:
                kept.add(i)
        for i in range(T):
            if real[2 * k, i] and i not in kept and not changed[2 * k, i]:
                changed[2 * k, i] = True  # a source word the edit no longer has
    return changed


class LocalBlend(AttentionController):
    """Prompt-to-Prompt's local blend for (source, edit) pairs: the edit keeps the source's pixels
    outside the region where the changed words attend.

    Attention: records the conditional rows' maps (their running sums over layers and steps, as
    `AttentionRecorder`). Called after every sampling step (`callback_on_step_end`): the changed
    tokens' summed map of each image is dilated by a pixel (3x3 max), divided by its maximum and
    thresholded at `threshold`; the union of the source's and the edit's region is where the edit
    keeps its own pixels, elsewhere it takes the source's: x_edit = x_source + m (x_edit - x_source).

    changed: (2P, T) bool, the changed tokens of each row (`changed_tokens`); size: the side, or
    (height, width), of the images it blends (pixels, or a latent diffusion model's latents).
    """

    def __init__(
        self,
        changed: torch.Tensor,
        size: int | tuple[int, int],
        threshold: float = 0.3,
        resolutions: set[int] | None = None,
    ):
        self.changed = changed
        self.threshold = threshold
        self.recorder = AttentionRecorder(size, resolutions=resolutions)

    def wants(self, site: AttentionSite) -> bool:
        return self.recorder.wants(site)

    def process(self, site: AttentionSite, probabilities: torch.Tensor) -> None:
        return self.recorder.process(site, probabilities)

    def region(self) -> torch.Tensor:
        """(P, height, width) bool: where each pair's edit keeps its own pixels."""
        total = self.recorder.total  # (2P, T, height, width) sums so far
        word = (total * self.changed.to(total.device, total.dtype)[:, :, None, None]).sum(1, keepdim=True)
        word = F.max_pool2d(word, 3, stride=1, padding=1)[:, 0]  # (2P, height, width)
        word = word / word.amax(dim=(-2, -1), keepdim=True).clamp_min(torch.finfo(word.dtype).tiny)
        inside = word > self.threshold
        return inside[0::2] | inside[1::2]

    def __call__(self, pipeline, step: int, timestep, tensors: dict) -> dict:
        x = tensors["latents"]  # (2P, C, H, W): the images, or a latent diffusion model's latents
        if self.recorder.total is None:
            return tensors
        keep = self.region().to(x.device)[:, None]  # (P, 1, H, W)
        source, edit = x[0::2], x[1::2]
        blended = x.clone()
        blended[1::2] = torch.where(keep, edit, source)
        return {**tensors, "latents": blended}
