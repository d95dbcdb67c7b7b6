"""Training: text encoder stage, then the UNet, through accelerate.

    output_dir/
        clip/            the small CLIP trained on the captions (only without text.pretrained)
        checkpoints/     step-XXXXXX/ folders (see checkpoint.py), the last `keep_checkpoints`
        samples/         validation grids, same prompts and noise every time
        model/           the final export (diffusers pipeline layout, EMA weights)
        config.yaml      the resolved config of this run

The loop is the usual diffusers one: DDPMScheduler noise, epsilon or v targets, optional
min-SNR-gamma weighting, captions dropped to "" for classifier-free guidance, AdamW with warm-up
and cosine decay, gradient clipping, EMA with warm-up. accelerate handles the device, mixed
precision, gradient accumulation and several processes (`accelerate launch` / `torchrun`).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import shutil
import time
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

from . import checkpoint as ckpt
from .config import Config, biased_timestep_count
from .data import build_dataset
from .errors import UserError
from .grounding import GroundingLoss, grounding_targets
from .images import labelled_grid, save_png
from .pipeline import Pipeline
from .precision import resolve_mixed_precision
from .text_encoder import EmbeddingCache, TextEncoder, fit_tokenizer, train_clip
from .unet import UNet, unet_settings


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


def clip_training_data(cfg: Config, images: torch.Tensor, captions: list[str], main: bool):
    """Images and captions for the small CLIP: the training set, except that a shapes set with
    `data.object_weights` is drawn again with every object count equally likely, so the CLIP
    learns long captions as well as short ones. Measured once: a CLIP trained on the
    3 : 4 : 2 : 1.5 mix took three-object prompts from 1.00 to 0.65 and counting from 0.92 to
    0.79 (n = 200 and 100 against a CLIP of the uniform mix, same UNet stage, train.seed 0). Other
    training seeds of one config spread as widely (three objects 0.615-0.97, README), so that run
    alone does not prove the CLIP was the cause; the uniform mix costs only its rendering."""
    if cfg.data.kind != "shapes" or cfg.data.object_weights is None:
        return images, captions
    uniform = build_dataset(dataclasses.replace(cfg.data, object_weights=None))
    return uniform.render_all(progress=main)


def prepare_text_encoder(cfg: Config, output_dir: Path, clip_data, accelerator: Accelerator) -> TextEncoder:
    """Load the pretrained CLIP named by text.pretrained, or train the small one on
    `clip_data()` (images, captions), once: a finished `output_dir/clip` is reused on resume."""
    options = {"hidden_layer": cfg.text.hidden_layer, "mask_eos": cfg.text.mask_eos,
               "concat_token_embeddings": cfg.text.concat_token_embeddings}
    if cfg.text.pretrained:
        return TextEncoder.from_pretrained(cfg.text.pretrained, max_length=None, **options)
    clip_dir = output_dir / "clip"
    if accelerator.is_main_process and not (clip_dir / "text_encoder").is_dir():
        start = time.time()
        images, captions = clip_data()
        tokenizer = fit_tokenizer(captions + cfg.train.validation_prompts, cfg.text.vocab_size, cfg.text.max_length)
        temporary = output_dir / ".clip.tmp"
        shutil.rmtree(temporary, ignore_errors=True)
        train_clip(images, captions, tokenizer, cfg.text, temporary, device=accelerator.device)
        ckpt.default_file_modes(temporary)
        os.replace(temporary, clip_dir)
        accelerator.print(f"text encoder: trained a small CLIP in {time.time() - start:.0f} s -> {clip_dir}")
    accelerator.wait_for_everyone()
    return TextEncoder.from_pretrained(str(clip_dir), max_length=cfg.text.max_length, **options)


def validation_grid(pipeline: Pipeline, cfg: Config, path: Path, step: int) -> None:
    out = pipeline(cfg.train.validation_prompts, seed=cfg.train.validation_seed, steps=cfg.train.validation_steps,
                   guidance=cfg.train.validation_guidance, progress=False)
    grid = labelled_grid(out.images, out.prompts, columns=min(4, len(out.images)))
    save_png(grid, path, {"step": step, "seed": cfg.train.validation_seed, **out.settings})


def timestep_weights(train_cfg) -> torch.Tensor | None:
    """Relative draw weight of each training timestep: None (uniform) by default; with
    `timestep_bias_multiplier` != 1, the noisiest `timestep_bias_portion` of them weigh that much
    (diffusers' "later" timestep bias; layout and binding are decided there)."""
    if train_cfg.timestep_bias_multiplier == 1 or train_cfg.timestep_bias_portion == 0:
        return None
    weights = torch.ones(train_cfg.num_train_timesteps)
    weights[-biased_timestep_count(train_cfg):] *= train_cfg.timestep_bias_multiplier
    return weights


def sample_timesteps(weights: torch.Tensor | None, num_timesteps: int, batch_size: int, device) -> torch.Tensor:
    """Training timesteps of one batch, drawn per `timestep_weights` (uniform: `torch.randint`,
    so runs without a bias reproduce draw for draw)."""
    if weights is None:
        return torch.randint(0, num_timesteps, (batch_size,), device=device)
    return torch.multinomial(weights, batch_size, replacement=True).to(device)


def train(cfg: Config, output_dir: str | Path, resume: str | None = None) -> Path:
    """Train per `cfg` into `output_dir`; returns the exported model folder."""
    output_dir = Path(output_dir)
    checkpoint_dir = output_dir / "checkpoints"
    resume_path = ckpt.resolve_resume(resume, checkpoint_dir) if resume else None
    if resume is None and ckpt.list_checkpoints(checkpoint_dir):
        raise UserError(f"'{output_dir}' already holds checkpoints; pass --resume latest to continue, "
                        "or choose another --output-dir")
    checkpoint = ckpt.load_checkpoint(resume_path) if resume_path else None
    if checkpoint:
        saved = checkpoint["state"].get("config", {})
        for section in ("model", "text", "data"):
            if saved.get(section) != cfg.to_dict()[section]:
                raise UserError(f"checkpoint '{resume_path}' was saved with other {section}.* settings; resume with "
                                "the config it was saved with (its state.json holds it)")
    dataset = build_dataset(cfg.data)  # checks the data settings before anything is written
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"cannot create output folder '{output_dir}': {error.strerror}") from None
    if not os.access(output_dir, os.W_OK):
        raise UserError(f"output folder '{output_dir}' is not writable; choose another --output-dir")

    accelerator = make_accelerator(cfg, output_dir)
    main = accelerator.is_main_process
    set_seed(cfg.train.seed, device_specific=True)  # different noise on each process
    if main:
        (output_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        if accelerator.trackers is not None and accelerator.log_with:
            accelerator.init_trackers("train", config={k: str(v) for k, v in cfg.to_dict().items()})

    # ---- data and text embeddings (computed once per distinct caption) ---------------------
    grounded = cfg.train.grounding_weight > 0  # shapes only (config check): the masks come with the images
    if grounded:
        images, captions, object_masks, scenes = dataset.render_with_masks(progress=main)
    else:
        images, captions = dataset.render_all(progress=main)  # (N, 3, R, R) uint8, N strings
    encoder = prepare_text_encoder(cfg, output_dir, lambda: clip_training_data(cfg, images, captions, main),
                                   accelerator)
    encoder.to(accelerator.device)
    distinct = sorted(set(captions))
    row_of = {caption: i for i, caption in enumerate(distinct)}
    cache = EmbeddingCache(encoder)
    caption_embeddings, caption_masks = cache.get(distinct)  # (U, T, D), (U, T)
    empty_embedding, empty_mask = cache.get([""])
    caption_rows = torch.tensor([row_of[c] for c in captions])
    device = accelerator.device
    grounding = None
    if grounded:
        token_object = grounding_targets(scenes, lambda c: encoder.tokenize(c)["offsets"])
        token_object, object_masks = token_object.to(device), object_masks.to(device)
        grounding = GroundingLoss(set(cfg.train.grounding_resolutions or cfg.model.attention_resolutions),
                                  pixel=cfg.train.grounding_pixel_weight > 0)
    caption_embeddings, caption_masks = caption_embeddings.to(device), caption_masks.to(device)
    empty_embedding, empty_mask = empty_embedding.to(device), empty_mask.to(device)
    images = images.to(device)

    # ---- model, noise schedule, optimizer, EMA ---------------------------------------------
    # the token embeddings come after the contextual states (text.concat_token_embeddings)
    unet = UNet(**unet_settings(cfg, encoder.embedding_dim, value_context_start=encoder.model.config.hidden_size))
    noise_scheduler = DDPMScheduler(num_train_timesteps=cfg.train.num_train_timesteps,
                                    beta_schedule=cfg.train.beta_schedule,
                                    prediction_type=cfg.train.prediction_type, clip_sample=True)
    # One fused kernel for all parameters where PyTorch has it: 4 ms a step here instead of 20 for
    # the per-parameter loop (the same update, rounded differently; bench/bench_training_overhead.py).
    fused = device.type in ("cpu", "cuda") or None
    optimizer = torch.optim.AdamW(unet.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay,
                                  fused=fused)
    lr_scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=cfg.train.warmup_steps,
                                 num_training_steps=cfg.train.max_steps)
    ema = EMAModel(unet.parameters(), decay=cfg.train.ema_decay, use_ema_warmup=True, power=3 / 4,
                   model_cls=UNet, model_config=unet.config)
    step = 0
    data_generator = torch.Generator().manual_seed(cfg.train.seed)  # same on every process
    if checkpoint:
        unet.load_state_dict(checkpoint["model"])
        ema_state = dict(checkpoint["state"]["ema"])
        ema_state["shadow_params"] = [checkpoint["ema"][n] for n, _ in unet.named_parameters()]
        ema.load_state_dict(ema_state)
        ckpt.restore_optimizer(checkpoint, optimizer)
        lr_scheduler.load_state_dict(checkpoint["state"]["lr_scheduler"])
        ckpt.restore_rng(checkpoint, data_generator)
        step = checkpoint["step"]
        accelerator.print(f"resumed from {resume_path} at step {step}")
    ema.to(device)
    # The LR schedule is stepped by hand once per optimizer step, so it is not prepared.
    raw_optimizer = optimizer
    unet, optimizer = accelerator.prepare(unet, optimizer)
    model = accelerator.unwrap_model(unet)
    accelerator.print(f"UNet: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
                      f"{len(distinct)} distinct captions, {len(captions)} images, device {device}, "
                      f"{accelerator.num_processes} process(es), mixed precision {accelerator.mixed_precision}")

    def save(step: int) -> None:
        if main:
            ckpt.save_checkpoint(checkpoint_dir, step, model, ema, raw_optimizer, lr_scheduler, data_generator,
                                 cfg.to_dict())
            ckpt.prune_checkpoints(checkpoint_dir, cfg.train.keep_checkpoints)
        accelerator.wait_for_everyone()

    def ema_pipeline() -> Pipeline:
        ema.store(model.parameters())
        ema.copy_to(model.parameters())
        return Pipeline(model, encoder, noise_scheduler.config, device, mixed_precision=accelerator.mixed_precision)

    def validate(step: int) -> None:
        if main:
            pipeline = ema_pipeline()
            validation_grid(pipeline, cfg, output_dir / "samples" / f"step-{step:06d}.png", step)
            ema.restore(model.parameters())
            model.train()
        accelerator.wait_for_everyone()

    # ---- the loop ---------------------------------------------------------------------------
    B = cfg.train.batch_size
    t_weights = timestep_weights(cfg.train)
    world, rank = accelerator.num_processes, accelerator.process_index
    progress = tqdm(total=cfg.train.max_steps, initial=step, desc="training", disable=not main, dynamic_ncols=True)
    unet.train()
    images_seen, start = 0, time.time()
    while step < cfg.train.max_steps:
        with accelerator.accumulate(unet):
            # every process draws the same global batch and takes its own slice of it
            index = torch.randint(len(captions), (B * world,), generator=data_generator)[rank * B:(rank + 1) * B]
            x0 = images[index.to(device)].float() / 127.5 - 1  # (B, 3, R, R) in [-1, 1]
            rows = caption_rows[index].to(device)
            embeddings, key_mask = caption_embeddings[rows], caption_masks[rows]  # (B, T, D), (B, T)
            dropped = torch.rand(B, device=device) < cfg.train.cond_dropout
            embeddings = torch.where(dropped[:, None, None], empty_embedding, embeddings)
            key_mask = torch.where(dropped[:, None], empty_mask, key_mask)

            noise = torch.randn_like(x0)
            timesteps = sample_timesteps(t_weights, cfg.train.num_train_timesteps, B, device)
            noisy = noise_scheduler.add_noise(x0, noise, timesteps)
            target = noise if cfg.train.prediction_type == "epsilon" else noise_scheduler.get_velocity(x0, noise, timesteps)
            if grounding is not None:
                grounding.set_batch(token_object[index.to(device)].long().masked_fill(dropped[:, None], -1),
                                    object_masks[index.to(device)].float())
            with accelerator.autocast():
                prediction = unet(noisy, timesteps, embeddings, key_mask, attention_controller=grounding)
            loss = F.mse_loss(prediction.float(), target, reduction="none").mean(dim=(1, 2, 3))
            if cfg.train.snr_gamma is not None:
                snr = compute_snr(noise_scheduler, timesteps)
                clipped = snr.clamp(max=cfg.train.snr_gamma)
                loss = loss * (clipped / snr if cfg.train.prediction_type == "epsilon" else clipped / (snr + 1))
            loss = loss.mean()
            if grounding is not None:
                grounding_loss = grounding.loss()
                loss = loss + cfg.train.grounding_weight * grounding_loss
                if grounding.pixel:
                    loss = loss + cfg.train.grounding_pixel_weight * grounding.pixel_loss()
            accelerator.backward(loss)
            if accelerator.sync_gradients and cfg.train.grad_clip > 0:
                accelerator.clip_grad_norm_(unet.parameters(), cfg.train.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        images_seen += B * world
        if not accelerator.sync_gradients:
            continue
        lr_scheduler.step()
        ema.step(model.parameters())
        step += 1
        progress.update(1)
        if step % cfg.train.log_every == 0 or step == cfg.train.max_steps:
            loss_value = accelerator.reduce(loss.detach(), reduction="mean").item()
            rate = images_seen / (time.time() - start)
            logs = {"loss": loss_value, "lr": lr_scheduler.get_last_lr()[0], "images_per_s": rate}
            if grounding is not None:
                logs["grounding"] = accelerator.reduce(grounding_loss.detach(), reduction="mean").item()
            progress.set_postfix(loss=f"{loss_value:.4f}", img_s=f"{rate:.0f}", lr=f"{logs['lr']:.2e}",
                                 **({"ground": f"{logs['grounding']:.3f}"} if grounding is not None else {}))
            accelerator.log(logs, step=step)
            if not math.isfinite(loss_value):
                raise RuntimeError(f"loss became {loss_value} at step {step}; lower train.lr or enable grad_clip")
        if step % cfg.train.checkpoint_every == 0 or step == cfg.train.max_steps:
            save(step)
        if step % cfg.train.validate_every == 0 or step == cfg.train.max_steps:
            validate(step)
    progress.close()
    elapsed = time.time() - start
    if images_seen:
        accelerator.print(f"trained {images_seen} images in {elapsed:.0f} s ({images_seen / elapsed:.0f} images/s)")

    # ---- export the EMA weights in diffusers' pipeline layout ------------------------------
    export_dir = output_dir / "model"
    if main:
        pipeline = ema_pipeline()
        pipeline.save_pretrained(export_dir, {"config.yaml": yaml.safe_dump(cfg.to_dict(), sort_keys=False)})
        ema.restore(model.parameters())
        accelerator.print(f"exported the EMA model to {export_dir}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return export_dir
