"""Training: text encoder stage, then the UNet, through accelerate.

    output_dir/
        clip/            the small CLIP trained on the captions (only without text.pretrained)
        checkpoints/     step-XXXXXX/ folders (see checkpoint.py), the last `keep_checkpoints`
        samples/         validation grids, same prompts and noise every time
        model/           the final export (diffusers pipeline layout, EMA weights)
        config.yaml      the resolved config of this run

The batches come from diffusion/data/batches.py (`prepare_data`): a shapes set rendered into
memory, its captions following the caption curriculum (data/captions.py), or an image folder
streamed from disk. The text encoder is trained or loaded on the way (training/clip.py).

The loop is the usual diffusers one: DDPMScheduler noise, epsilon or v targets, optional
min-SNR-gamma weighting, captions dropped to "" for classifier-free guidance, AdamW with warm-up
and cosine decay, gradient clipping, EMA with warm-up. accelerate handles the device, mixed
precision, gradient accumulation and several processes (`accelerate launch` / `torchrun`).
"""

from __future__ import annotations

import importlib.util
import os
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from accelerate import Accelerator, PartialState
from accelerate.utils import set_seed
from diffusers import DDPMScheduler
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel, compute_snr
from tqdm.auto import tqdm

from diffusion import checkpoint as ckpt
from diffusion.config import Config, biased_timestep_count
from diffusion.data.batches import Batch, InMemoryData, StreamingData, drop_captions, prepare_data
from diffusion.data.datasets import build_dataset
from diffusion.data.text_states import cache_folder
from diffusion.errors import UserError
from diffusion.images import labelled_grid, save_png
from diffusion.model.text_encoder import TextEncoder
from diffusion.model.unet import UNet, estimate_clean, unet_settings
from diffusion.model.unet2d import DiffusersUNet, unet2d_settings
from diffusion.precision import resolve_mixed_precision
from diffusion.sampling.pipeline import Pipeline
from diffusion.training.grounding import GroundingLoss


def make_accelerator(cfg: Config, output_dir: Path) -> Accelerator:
    distributed_cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    log_with = "tensorboard" if importlib.util.find_spec("tensorboard") else None
    device = PartialState(cpu=distributed_cpu).device  # the device Accelerator will pick
    return Accelerator(
        mixed_precision=resolve_mixed_precision(cfg.train.mixed_precision, device),
        gradient_accumulation_steps=cfg.train.gradient_accumulation_steps,
        log_with=log_with,
        project_dir=str(output_dir),
        cpu=distributed_cpu,  # torchrun on CPUs: gloo processes rather than one
    )


def validation_grid(pipeline: Pipeline, cfg: Config, path: Path, step: int) -> None:
    out = pipeline(
        cfg.train.validation_prompts,
        seed=cfg.train.validation_seed,
        steps=cfg.train.validation_steps,
        guidance=cfg.train.validation_guidance,
        progress=False,
    )
    grid = labelled_grid(out.images, out.prompts, columns=min(4, len(out.images)))
    save_png(grid, path, {"step": step, "seed": cfg.train.validation_seed, **out.settings})


def timestep_weights(train_cfg) -> torch.Tensor | None:
    """Relative draw weight of each training timestep: None (uniform) by default; with
    `timestep_bias_multiplier` != 1, the noisiest `timestep_bias_portion` of them weigh that much
    (diffusers' "later" timestep bias; layout and binding are decided there)."""
    if train_cfg.timestep_bias_multiplier == 1 or train_cfg.timestep_bias_portion == 0:
        return None
    weights = torch.ones(train_cfg.num_train_timesteps)
    weights[-biased_timestep_count(train_cfg) :] *= train_cfg.timestep_bias_multiplier
    return weights


def sample_timesteps(weights: torch.Tensor | None, num_timesteps: int, batch_size: int, device) -> torch.Tensor:
    """Training timesteps of one batch, drawn per `timestep_weights` (uniform: `torch.randint`,
    so runs without a bias reproduce draw for draw)."""
    if weights is None:
        return torch.randint(0, num_timesteps, (batch_size,), device=device)
    return torch.multinomial(weights, batch_size, replacement=True).to(device)


class TrainStep:
    """One step on the denoiser: noise the batch at drawn timesteps, predict (epsilon or v), the
    MSE loss (min-SNR weighted if asked) plus the grounding losses, backward, clip, update.

    Returns the (detached) loss and grounding loss (None without grounding); `accelerator`
    handles gradient accumulation, mixed precision and several processes."""

    def __init__(
        self,
        cfg: Config,
        unet,
        noise_scheduler: DDPMScheduler,
        optimizer,
        accelerator: Accelerator,
        grounding: GroundingLoss | None = None,
    ):
        self.train_cfg = cfg.train
        self.unet, self.noise_scheduler, self.optimizer = unet, noise_scheduler, optimizer
        self.accelerator, self.grounding = accelerator, grounding
        self.timestep_weights = timestep_weights(cfg.train)
        self.self_conditioning = cfg.model.self_conditioning

    def clean_estimates(self, noisy: torch.Tensor, timesteps: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Self-conditioning's second input (B, 3, R, R): for the first half of the rows the model's
        own estimate of the clean image from `noisy` alone (no gradient, as Chen et al.), zeros for
        the rest, so that it learns both to start from nothing and to refine an estimate. The rows
        are random draws, so a fixed half is a random half, and the extra call keeps one shape."""
        estimates = torch.zeros_like(noisy)
        half = len(noisy) // 2
        if half:
            with torch.no_grad(), self.accelerator.autocast():
                prediction = self.unet(noisy[:half], timesteps[:half], batch.embeddings[:half], batch.key_mask[:half])
            alphas = self.noise_scheduler.alphas_cumprod[timesteps[:half].cpu()]
            estimates[:half] = estimate_clean(prediction, noisy[:half], alphas, self.train_cfg.prediction_type)
        return estimates

    def __call__(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor | None]:
        train_cfg, accelerator, grounding = self.train_cfg, self.accelerator, self.grounding
        with accelerator.accumulate(self.unet):
            noise = torch.randn_like(batch.x0)
            timesteps = sample_timesteps(
                self.timestep_weights, train_cfg.num_train_timesteps, len(batch.x0), batch.x0.device
            )
            noisy = self.noise_scheduler.add_noise(batch.x0, noise, timesteps)
            target = (
                noise
                if train_cfg.prediction_type == "epsilon"
                else self.noise_scheduler.get_velocity(batch.x0, noise, timesteps)
            )
            if self.self_conditioning:
                noisy = torch.cat([noisy, self.clean_estimates(noisy, timesteps, batch)], dim=1)
            if grounding is not None:
                grounding.set_batch(batch.token_object, batch.object_masks)
            with accelerator.autocast():
                prediction = self.unet(
                    noisy, timesteps, batch.embeddings, batch.key_mask, attention_controller=grounding
                )
            loss = F.mse_loss(prediction.float(), target, reduction="none").mean(dim=(1, 2, 3))
            if train_cfg.snr_gamma is not None:
                snr = compute_snr(self.noise_scheduler, timesteps)
                clipped = snr.clamp(max=train_cfg.snr_gamma)
                loss = loss * (clipped / snr if train_cfg.prediction_type == "epsilon" else clipped / (snr + 1))
            loss = loss.mean()
            grounding_loss = None
            if grounding is not None:
                grounding_loss = grounding.loss()
                loss = loss + train_cfg.grounding_weight * grounding_loss
                if grounding.pixel:
                    loss = loss + train_cfg.grounding_pixel_weight * grounding.pixel_loss()
            accelerator.backward(loss)
            if accelerator.sync_gradients and train_cfg.grad_clip > 0:
                accelerator.clip_grad_norm_(self.unet.parameters(), train_cfg.grad_clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return loss.detach(), None if grounding_loss is None else grounding_loss.detach()


def new_unet(cfg: Config, encoder: TextEncoder) -> UNet | DiffusersUNet:
    """The UNet a config describes (`model.kind`), for `encoder`'s text states (the token
    embeddings, when appended, start after the contextual states: text.concat_token_embeddings)."""
    if cfg.model.kind == "unet2d":
        return DiffusersUNet(**unet2d_settings(cfg, encoder.embedding_dim))
    return UNet(**unet_settings(cfg, encoder.embedding_dim, value_context_start=encoder.model.config.hidden_size))


def noise_schedule(cfg: Config) -> DDPMScheduler:
    return DDPMScheduler(
        num_train_timesteps=cfg.train.num_train_timesteps,
        beta_schedule=cfg.train.beta_schedule,
        prediction_type=cfg.train.prediction_type,
        clip_sample=True,
    )


def new_optimizer(cfg: Config, unet: UNet | DiffusersUNet, device: torch.device) -> torch.optim.Optimizer:
    # One fused kernel for all parameters where PyTorch has it, instead of a loop over them.
    fused = device.type in ("cpu", "cuda") or None
    return torch.optim.AdamW(unet.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay, fused=fused)


# Data settings that change how a run reads its data, not what it computes: a run may resume with others.
HOW_DATA_IS_READ = ("workers", "embedding_cache")


# Model keys added after checkpoints were written, with the value that those runs trained with:
# a checkpoint without them resumes under a config that has these values.
ADDED_MODEL_KEYS = {"kind": "unet", "pooled_text": False}


def _results_settings(section: dict | None) -> dict:
    """A config section without the keys of HOW_DATA_IS_READ (absent from older checkpoints too)."""
    return {key: value for key, value in (section or {}).items() if key not in HOW_DATA_IS_READ}


def check_resume(cfg: Config, output_dir: Path, resume: str | None) -> dict | None:
    """The checkpoint to resume from (None: a fresh run), after checking that a fresh run does not
    overwrite checkpoints and that a resumed one keeps the model, text and data settings."""
    checkpoint_dir = output_dir / "checkpoints"
    if resume is None and ckpt.list_checkpoints(checkpoint_dir):
        raise UserError(
            f"'{output_dir}' already holds checkpoints; pass --resume latest to continue, "
            "or choose another --output-dir"
        )
    if resume == "latest":
        checkpoint = ckpt.load_latest(checkpoint_dir)  # passes over a corrupt newest one
    else:
        resume_path = ckpt.resolve_resume(resume, checkpoint_dir) if resume else None
        checkpoint = {**ckpt.load_checkpoint(resume_path), "path": resume_path} if resume_path else None
    if checkpoint:
        resume_path = checkpoint["path"]
        saved = dict(checkpoint["state"].get("config", {}))
        saved["model"] = {**ADDED_MODEL_KEYS, **saved.get("model", {})}
        for section in ("model", "text", "data"):
            if _results_settings(saved.get(section)) != _results_settings(cfg.to_dict()[section]):
                raise UserError(
                    f"checkpoint '{resume_path}' was saved with other {section}.* settings; resume with "
                    "the config it was saved with (its state.json holds it)"
                )
    return checkpoint


def prepare_output_dir(output_dir: Path) -> None:
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"cannot create output folder '{output_dir}': {error.strerror}") from None
    if not os.access(output_dir, os.W_OK):
        raise UserError(f"output folder '{output_dir}' is not writable; choose another --output-dir")


class Trainer:
    """The model, optimiser, schedules and EMA of a run, and its loop with checkpoints and
    validation grids (see `train`)."""

    def __init__(
        self,
        cfg: Config,
        output_dir: Path,
        accelerator: Accelerator,
        data: InMemoryData | StreamingData,
        encoder: TextEncoder,
        checkpoint: dict | None,
    ):
        self.cfg, self.output_dir, self.accelerator = cfg, output_dir, accelerator
        self.data, self.encoder = data, encoder
        device = accelerator.device
        unet = new_unet(cfg, encoder)
        self.noise_scheduler = noise_schedule(cfg)
        optimizer = new_optimizer(cfg, unet, device)
        self.lr_scheduler = get_scheduler(
            "cosine", optimizer, num_warmup_steps=cfg.train.warmup_steps, num_training_steps=cfg.train.max_steps
        )
        self.ema = EMAModel(
            unet.parameters(),
            decay=cfg.train.ema_decay,
            use_ema_warmup=True,
            power=3 / 4,
            model_cls=type(unet),
            model_config=unet.config,
        )
        self.step = 0
        self.data_generator = torch.Generator().manual_seed(cfg.train.seed)  # same on every process
        if checkpoint:
            unet.load_state_dict(checkpoint["model"])
            ema_state = dict(checkpoint["state"]["ema"])
            ema_state["shadow_params"] = [checkpoint["ema"][n] for n, _ in unet.named_parameters()]
            self.ema.load_state_dict(ema_state)
            ckpt.restore_optimizer(checkpoint, optimizer)
            self.lr_scheduler.load_state_dict(checkpoint["state"]["lr_scheduler"])
            ckpt.restore_rng(checkpoint, self.data_generator)
            self.step = checkpoint["step"]
            accelerator.print(f"resumed from {checkpoint['path']} at step {self.step}")
        self.ema.to(device)
        # The LR schedule is stepped by hand once per optimizer step, so it is not prepared.
        self.raw_optimizer = optimizer
        self.unet, optimizer = accelerator.prepare(unet, optimizer)
        self.model = accelerator.unwrap_model(self.unet)
        grounding = None
        if data.token_object is not None:
            grounding = GroundingLoss(
                set(cfg.train.grounding_resolutions or cfg.model.attention_resolutions),
                pixel=cfg.train.grounding_pixel_weight > 0,
            )
        self.train_step = TrainStep(cfg, self.unet, self.noise_scheduler, optimizer, accelerator, grounding)
        accelerator.print(
            f"UNet: {sum(p.numel() for p in self.model.parameters()) / 1e6:.2f}M parameters, "
            f"{data.distinct_count} distinct captions, {len(data)} images, device {device}, "
            f"{accelerator.num_processes} process(es), mixed precision {accelerator.mixed_precision}"
        )

    def batches(self) -> Iterator[Batch]:
        """This process's batches from where the run stands (a resumed run: its step)."""
        first_draw = self.step * self.cfg.train.gradient_accumulation_steps  # one draw per micro-batch
        return self.data.batches(
            self.data_generator,
            first_draw,
            self.cfg.train.batch_size,
            self.accelerator.num_processes,
            self.accelerator.process_index,
        )

    def next_batch(self, batches: Iterator[Batch]) -> Batch:
        """The next of `batches`, its captions dropped to "" with probability train.cond_dropout."""
        batch = next(batches)
        dropped = torch.rand(len(batch.x0), device=self.accelerator.device) < self.cfg.train.cond_dropout
        return drop_captions(batch, dropped, self.data.empty)

    def run(self) -> None:
        cfg, accelerator = self.cfg, self.accelerator
        main = accelerator.is_main_process
        progress = tqdm(
            total=cfg.train.max_steps, initial=self.step, desc="training", disable=not main, dynamic_ncols=True
        )
        self.unet.train()
        images_seen, start = 0, time.time()
        batches = self.batches()
        # The first step whose loss was not finite (-1: none), kept on the device and read only
        # when the loop reads the loss anyway, and before anything is written from the weights.
        first_bad = torch.full((), -1, dtype=torch.long, device=accelerator.device)
        try:
            while self.step < cfg.train.max_steps:
                loss, grounding_loss = self.train_step(self.next_batch(batches))
                images_seen += cfg.train.batch_size * accelerator.num_processes
                bad = ~torch.isfinite(loss) & (first_bad < 0)
                first_bad = torch.where(bad, self.step + 1, first_bad)
                if not accelerator.sync_gradients:
                    continue
                self.lr_scheduler.step()
                self.ema.step(self.model.parameters())
                self.step += 1
                progress.update(1)
                log = self.step % cfg.train.log_every == 0 or self.step == cfg.train.max_steps
                save = self.step % cfg.train.checkpoint_every == 0 or self.step == cfg.train.max_steps
                validate = self.step % cfg.train.validate_every == 0 or self.step == cfg.train.max_steps
                if log or save or validate:
                    self.check_finite(first_bad)
                if log:
                    self.log(progress, loss, grounding_loss, images_seen / (time.time() - start))
                if save:
                    self.save()
                if validate:
                    self.validate()
        finally:
            batches.close()  # ends the DataLoader's worker processes, if any
        progress.close()
        elapsed = time.time() - start
        if images_seen:
            accelerator.print(f"trained {images_seen} images in {elapsed:.0f} s ({images_seen / elapsed:.0f} images/s)")

    def log(self, progress, loss: torch.Tensor, grounding_loss: torch.Tensor | None, rate: float) -> None:
        accelerator = self.accelerator
        loss_value = accelerator.reduce(loss, reduction="mean").item()
        logs = {"loss": loss_value, "lr": self.lr_scheduler.get_last_lr()[0], "images_per_s": rate}
        postfix = {"loss": f"{loss_value:.4f}", "img_s": f"{rate:.0f}", "lr": f"{logs['lr']:.2e}"}
        if grounding_loss is not None:
            logs["grounding"] = accelerator.reduce(grounding_loss, reduction="mean").item()
            postfix["ground"] = f"{logs['grounding']:.3f}"
        progress.set_postfix(**postfix)
        accelerator.log(logs, step=self.step)

    def check_finite(self, first_bad: torch.Tensor) -> None:
        """Stop the run if any process's loss was NaN or infinite at some step (`first_bad` >= 0):
        the weights have taken that step's update, so nothing more is saved from them. Stopping,
        not skipping the step: AdamW has already folded the bad gradient into its moments."""
        steps = [int(s) for s in self.accelerator.gather(first_bad.reshape(1)).tolist() if s >= 0]
        if steps:
            newest = ckpt.list_checkpoints(self.output_dir / "checkpoints")
            kept = f"the newest checkpoint, {newest[-1].name}, is intact" if newest else "no checkpoint was written"
            raise UserError(
                f"training diverged: the loss was not finite at step {min(steps)}; {kept}; "
                "resume with --resume latest and a lower train.lr, or train.grad_clip > 0"
            )

    def save(self) -> None:
        if self.accelerator.is_main_process:
            checkpoint_dir = self.output_dir / "checkpoints"
            ckpt.save_checkpoint(
                checkpoint_dir,
                self.step,
                self.model,
                self.ema,
                self.raw_optimizer,
                self.lr_scheduler,
                self.data_generator,
                self.cfg.to_dict(),
            )
            ckpt.prune_checkpoints(checkpoint_dir, self.cfg.train.keep_checkpoints)
        self.accelerator.wait_for_everyone()

    def ema_pipeline(self) -> Pipeline:
        """A pipeline on the EMA weights (swapped into the model; `ema.restore` puts them back)."""
        self.ema.store(self.model.parameters())
        self.ema.copy_to(self.model.parameters())
        return Pipeline.from_parts(
            self.model,
            self.encoder,
            self.noise_scheduler.config,
            self.accelerator.device,
            mixed_precision=self.accelerator.mixed_precision,
        )

    def validate(self) -> None:
        if self.accelerator.is_main_process:
            validation_grid(
                self.ema_pipeline(), self.cfg, self.output_dir / "samples" / f"step-{self.step:06d}.png", self.step
            )
            self.ema.restore(self.model.parameters())
            self.model.train()
        self.accelerator.wait_for_everyone()

    def export(self) -> Path:
        """Write the EMA weights in diffusers' pipeline layout to output_dir/model."""
        export_dir = self.output_dir / "model"
        if self.accelerator.is_main_process:
            self.ema_pipeline().save_pretrained(
                export_dir, {"config.yaml": yaml.safe_dump(self.cfg.to_dict(), sort_keys=False)}
            )
            self.ema.restore(self.model.parameters())
            self.accelerator.print(f"exported the EMA model to {export_dir}")
        self.accelerator.wait_for_everyone()
        return export_dir


def train(cfg: Config, output_dir: str | Path, resume: str | None = None) -> Path:
    """Train per `cfg` into `output_dir`; returns the exported model folder."""
    output_dir = Path(output_dir)
    checkpoint = check_resume(cfg, output_dir, resume)
    # checks the data settings (and that a grounded folder has masks) before anything is written
    dataset = build_dataset(cfg.data, grounded=cfg.train.grounding_weight > 0)
    if cfg.data.kind == "imagefolder":
        cache_folder(cfg.data.embedding_cache)  # likewise where the text states go
    prepare_output_dir(output_dir)
    accelerator = make_accelerator(cfg, output_dir)
    set_seed(cfg.train.seed, device_specific=True)  # different noise on each process
    try:
        if accelerator.is_main_process:
            (output_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
            if accelerator.trackers is not None and accelerator.log_with:
                accelerator.init_trackers("train", config={k: str(v) for k, v in cfg.to_dict().items()})
        data, encoder = prepare_data(cfg, dataset, output_dir, accelerator)
        trainer = Trainer(cfg, output_dir, accelerator, data, encoder, checkpoint)
        trainer.run()
        export_dir = trainer.export()
    except ckpt.WRITE_ERRORS as error:  # the writes without their own message (validation grids, logs)
        if not ckpt.disk_full(error):
            raise
        where = getattr(error, "filename", None) or output_dir
        raise UserError(f"cannot write '{where}': {ckpt.write_problem(error)}") from None
    accelerator.end_training()
    return export_dir
