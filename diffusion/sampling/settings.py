"""The settings of a render: everything about sampling but the prompts, the seeds and how many.

    settings = SamplingSettings(steps=30, guidance=5.0, weighting=Weighting("embedding"))
    pipe.generate(["a (red:0) circle"], settings)         # or pipe(prompt, steps=30, guidance=5.0)
    pipe.swap("a red circle", "a blue circle", settings.but(edit_steps=0.4))

The pipeline, evaluate.py and the editor all take one; it is checked once, when it is made, so a
bad value is a one-line UserError before any work. `record()` is what a PNG's metadata keeps.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from diffusion.config import (
    DEFAULT_EDIT_STEPS,
    DEFAULT_GUIDANCE_CUTOFF,
    DEFAULT_SAMPLER,
    MIXED_PRECISION,
    SAMPLER_NAMES,
)
from diffusion.control.weighting import Weighting
from diffusion.errors import UserError


@dataclass(frozen=True)
class SamplingSettings:
    steps: int = 20  # sampler steps, on DDIM's "leading" timesteps (sampling/pipeline.py)
    guidance: float = 3.0  # classifier-free guidance scale; 1 runs the conditional rows alone
    # guidance acts at the steps before this fraction of them; the later steps run the
    # conditional rows alone, at half the UNet's work (1: every step)
    guidance_cutoff: float = DEFAULT_GUIDANCE_CUTOFF
    sampler: str = DEFAULT_SAMPLER  # one of config.SAMPLER_NAMES
    # replaces the empty prompt of guidance's unconditional half: one for all, or one per prompt
    negative_prompt: str | list[str] | None = None
    weighting: Weighting = field(default_factory=Weighting)  # how (word:w) weights act
    # the UNet's autocast ("auto", "no", "bf16", "fp16"); None: the pipeline's own `precision`
    mixed_precision: str | None = None
    # word swaps (`Pipeline.swap`): the fraction of the steps the source's maps are injected in;
    # whether the edit keeps the source's pixels outside the changed words' maps (local blend);
    # whether the other words keep the source's maps at every step (None: by the kind of swap)
    edit_steps: float = DEFAULT_EDIT_STEPS
    local_blend: bool = False
    keep_layout: bool | None = None

    def __post_init__(self):
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise UserError(f"steps must be a positive whole number, got {self.steps}")
        if not _number(self.guidance) or self.guidance < 0:
            raise UserError(f"guidance must be a finite number >= 0, got {self.guidance}")
        if not _number(self.guidance_cutoff) or not 0 <= self.guidance_cutoff <= 1:
            raise UserError(f"guidance cutoff must be a fraction of the steps in [0, 1], got {self.guidance_cutoff}")
        if self.sampler not in SAMPLER_NAMES:
            raise UserError(f"unknown sampler '{self.sampler}'; choose one of {', '.join(SAMPLER_NAMES)}")
        negative = self.negative_prompt
        if not (negative is None or isinstance(negative, str) or all(isinstance(p, str) for p in negative)):
            raise UserError("the negative prompt must be a string, or a list of strings (one per prompt)")
        if not isinstance(self.weighting, Weighting):
            raise UserError(f"weighting must be a Weighting, got {type(self.weighting).__name__}")
        self.weighting.check()
        if self.mixed_precision is not None and self.mixed_precision not in MIXED_PRECISION:
            raise UserError(
                f"unknown mixed precision '{self.mixed_precision}'; choose one of {', '.join(MIXED_PRECISION)}"
            )
        if not _number(self.edit_steps) or not 0 <= self.edit_steps <= 1:
            raise UserError(f"edit steps must be a fraction in [0, 1], got {self.edit_steps}")
        if self.keep_layout not in (None, True, False):
            raise UserError(f"keep_layout must be True, False or None (auto), got {self.keep_layout!r}")

    def but(self, **changes) -> SamplingSettings:
        """A copy with `changes` (field names of this class), checked as a new one is; this one
        itself when there are none (the pipeline asks at every batch)."""
        if not changes:
            return self
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            names = ", ".join(f.name for f in dataclasses.fields(self))
            raise TypeError(f"unknown sampling setting(s) {', '.join(unknown)}; the settings are {names}")
        return dataclasses.replace(self, **changes)

    def record(self, mixed_precision: str) -> dict:
        """What an image's metadata keeps of the sampling (mixed_precision: the one in effect)."""
        return {
            "steps": self.steps,
            "guidance": self.guidance,
            "guidance_cutoff": self.guidance_cutoff,
            "sampler": self.sampler,
            "negative_prompt": self.negative_prompt or "",
            "weight_mode": self.weighting.mode,
            "weight_context": self.weighting.context,
            "weight_steps": list(self.weighting.window),
            "mixed_precision": mixed_precision,
        }


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
