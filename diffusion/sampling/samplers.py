"""The samplers: diffusers schedulers built on the training noise schedule, visiting the same timesteps.

Every sampler shares diffusers' contract (`set_timesteps`, `scale_model_input`, `step`), so
`Pipeline.denoise` runs any of them; `SAMPLERS` names them (config.SAMPLER_NAMES repeats the names
for the command lines, which do not import torch).
"""

from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

from diffusion.errors import UserError

# name -> (scheduler class, settings over the training scheduler's config).
# Every sampler visits the same timesteps, DDIM's "leading" ones: (K-1)r, ..., r, 0 with
# r = num_train_timesteps // K (see `sampler_timesteps`). Not the last timestep: the cosine
# schedule's t = 999 has alpha_bar ~ 2e-9, where an epsilon model's x0 estimate explodes and
# samplers that do not clip x0 (DPM++, Euler) end in noise. DPM++ gets these timesteps passed in:
# its own "leading" rule divides by K + 1 and starts low (t = 750 for 250 steps), so it would begin
# from pure noise labelled as a quarter-clean image. DPM++ also clips x0 by dynamic thresholding to
# [-1, 1]. DDIM must not clip (clip_sample is on in the training scheduler's config): it clips x0
# but keeps the unclipped noise estimate, and with guidance the two disagree at every step, so more
# steps made worse images; unclipped, DDIM gives Euler's images, as the ODE says it must (tested).
SAMPLERS = {
    "dpm++": (
        DPMSolverMultistepScheduler,
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "thresholding": True, "sample_max_value": 1.0},
    ),
    "ddim": (DDIMScheduler, {"timestep_spacing": "leading", "clip_sample": False}),
    "ddpm": (DDPMScheduler, {}),
    "euler": (EulerDiscreteScheduler, {"timestep_spacing": "leading"}),
}


def make_sampler(name: str, scheduler_config: dict):
    """A fresh diffusers scheduler for sampler `name`, built on the training noise schedule."""
    if name not in SAMPLERS:
        raise UserError(f"unknown sampler '{name}'; choose one of {', '.join(SAMPLERS)}")
    cls, settings = SAMPLERS[name]
    return cls.from_config(scheduler_config, **settings)


def sampler_timesteps(steps: int, num_train_timesteps: int) -> list[int]:
    """The `steps` timesteps every sampler visits, noisiest first: DDIM's "leading" spacing."""
    if not 1 <= steps <= num_train_timesteps:
        raise UserError(
            f"steps must be between 1 and the model's {num_train_timesteps} training timesteps, got {steps}"
        )
    ratio = num_train_timesteps // steps
    return [k * ratio for k in reversed(range(steps))]


def set_sampler_timesteps(scheduler, steps: int, device=None) -> None:
    """`scheduler.set_timesteps` for `steps` steps on the timesteps of `sampler_timesteps`."""
    timesteps = sampler_timesteps(steps, scheduler.config.num_train_timesteps)  # also the range check
    if isinstance(scheduler, DPMSolverMultistepScheduler):  # its own "leading" rule differs
        scheduler.set_timesteps(timesteps=timesteps, device=device)
    else:  # DDIM takes no `timesteps`; "leading" spacing gives these same ones (tested)
        scheduler.set_timesteps(steps, device=device)
