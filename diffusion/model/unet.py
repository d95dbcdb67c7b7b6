"""A compact text-conditioned UNet for images in pixel space.

    image (B, 3, R, R) --conv--> level 0 --down--> level 1 --down--> ... --> middle
                                  |  skip           |  skip
    eps/v  (B, 3, R, R) <--conv-- level 0 <--up---- level 1 <--up---- ... <--'

Each level has `blocks_per_level` ResNet blocks (with the timestep embedding added), each
followed, at the resolutions in `attention_resolutions`, by a transformer block whose
cross-attention reads the text embeddings. The middle always has one.

A diffusers `ModelMixin` + `ConfigMixin`: `save_pretrained(dir)` writes `config.json` and
safetensors weights, `UNet.from_pretrained(dir)` reads them back.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import get_timestep_embedding
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from diffusion.model.attention import AttentionCall, AttentionController, TransformerBlock


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, with the timestep embedding added in between."""

    def __init__(self, in_channels: int, out_channels: int, time_dim: int, dropout: float, groups: int = 8):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_proj = nn.Linear(time_dim, out_channels)
        self.norm2 = nn.GroupNorm(groups, out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)  # each block starts as the identity
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, time_embedding: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_proj(time_embedding)[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class Level(nn.Module):
    """The ResNet (+ transformer) blocks of one resolution, on the way down or up."""

    def __init__(
        self,
        in_channels: list[int],
        out_channels: int,
        time_dim: int,
        context_dim: int,
        heads: int,
        attention: bool,
        dropout: float,
        name: str,
        position_grid: int | None = None,
        value_start: int = 0,
    ):
        super().__init__()
        self.resnets = nn.ModuleList(ResBlock(c, out_channels, time_dim, dropout) for c in in_channels)
        self.attentions = (
            nn.ModuleList(
                TransformerBlock(
                    out_channels,
                    context_dim,
                    heads,
                    f"{name}.attn.{i}",
                    position_grid=position_grid,
                    value_start=value_start,
                )
                for i in range(len(in_channels))
            )
            if attention
            else None
        )


class _LevelMaker:
    """Makes the Levels of one UNet: the settings every level shares, and what follows from a
    level's side (whether it attends, its position grid, where its values start)."""

    def __init__(
        self,
        time_dim: int,
        context_dim: int,
        heads: int,
        attention_resolutions,
        dropout: float,
        position_embedding: bool,
        value_context_start: int,
        value_context_resolutions,
    ):
        self.time_dim, self.context_dim, self.heads, self.dropout = time_dim, context_dim, heads, dropout
        self.attention_resolutions, self.position_embedding = attention_resolutions, position_embedding
        self.value_context_start, self.value_context_resolutions = value_context_start, value_context_resolutions

    def position_grid(self, resolution: int) -> int | None:
        return resolution if self.position_embedding else None

    def value_start(self, resolution: int) -> int:
        if self.value_context_resolutions is None or resolution in self.value_context_resolutions:
            return self.value_context_start
        return 0

    def level(self, in_channels: list[int], width: int, resolution: int, name: str) -> Level:
        return Level(
            in_channels,
            width,
            self.time_dim,
            self.context_dim,
            self.heads,
            resolution in self.attention_resolutions,
            self.dropout,
            name,
            self.position_grid(resolution),
            self.value_start(resolution),
        )


class UNet(ModelMixin, ConfigMixin):
    @register_to_config
    def __init__(
        self,
        sample_size: int = 32,
        in_channels: int = 3,
        out_channels: int = 3,
        channels: tuple[int, ...] = (32, 64, 128),
        blocks_per_level: int = 1,
        attention_resolutions: tuple[int, ...] = (16, 8),
        attention_heads: int = 4,
        context_dim: int = 128,
        dropout: float = 0.0,
        position_embedding: bool = True,
        value_context_start: int = 0,
        value_context_resolutions: tuple[int, ...] | None = None,
        self_conditioning: bool = False,
        pooled_text: bool = False,
    ):
        """sample_size: image side in pixels; channels: width of each level (level i works at
        sample_size / 2**i); attention_resolutions: the sides (px) whose levels carry
        transformer blocks; attention_heads: number of heads (head width = channels / heads);
        context_dim: width D of the text-token embeddings; position_embedding: add a fixed 2D
        sine-cosine position embedding in every transformer block (queries know where they are);
        value_context_start: cross-attention values read only the text features from this index
        on (keys read them all): with the token embeddings appended to the contextual states, their
        start, so that a word's value carries that word alone and no context (0: values read all);
        value_context_resolutions: the feature-map sides whose cross-attention that applies to
        (None: all); self_conditioning: the input also carries the model's previous estimate of the
        clean image, `in_channels` more channels (self-conditioning, Chen, Zhang and Hinton 2022);
        pooled_text: the mean of the readable text states is also added to the timestep embedding,
        so every ResNet block reads the prompt as a whole (as Imagen's and SDXL's pooled text
        embeddings): a second path for the text, besides cross-attention, which attention-mode
        weights do not reach (embedding-mode weights do: they change the states)."""
        super().__init__()
        time_dim = 4 * channels[0]
        self.time_mlp = nn.Sequential(nn.Linear(channels[0], time_dim), nn.SiLU(), nn.Linear(time_dim, time_dim))
        self.conv_in = nn.Conv2d(in_channels * (2 if self_conditioning else 1), channels[0], 3, padding=1)
        self.resolutions = [sample_size // 2**i for i in range(len(channels))]
        levels = _LevelMaker(
            time_dim,
            context_dim,
            attention_heads,
            attention_resolutions,
            dropout,
            position_embedding,
            value_context_start,
            value_context_resolutions,
        )
        # The modules are made in the order of their parameters in a checkpoint (down, middle, up),
        # which is also the order their initial weights are drawn in.
        previous = self._make_down_path(channels, blocks_per_level, levels)
        self.mid_resnet1 = ResBlock(previous, previous, time_dim, dropout)
        self.mid_attention = TransformerBlock(
            previous,
            context_dim,
            attention_heads,
            "mid.attn.0",
            position_grid=levels.position_grid(self.resolutions[-1]),
            value_start=levels.value_start(self.resolutions[-1]),
        )
        self.mid_resnet2 = ResBlock(previous, previous, time_dim, dropout)
        self._make_up_path(channels, blocks_per_level, levels, previous)
        self.norm_out = nn.GroupNorm(8, channels[0])
        self.conv_out = nn.Conv2d(channels[0], out_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)
        # Last and zero-initialised: the other weights are drawn as without it, and the model
        # starts as it would without the pooled text.
        self.text_to_time = nn.Linear(context_dim, time_dim) if pooled_text else None
        if pooled_text:
            nn.init.zeros_(self.text_to_time.weight)
            nn.init.zeros_(self.text_to_time.bias)

    def _make_down_path(self, channels, blocks_per_level: int, levels: _LevelMaker) -> int:
        """`self.down` (a Level per width) and `self.downsamples` (a strided conv after each but
        the last); returns the width entering the middle."""
        self.down = nn.ModuleList()
        self.downsamples = nn.ModuleList()
        previous = channels[0]
        for i, width in enumerate(channels):
            ins = [previous] + [width] * (blocks_per_level - 1)
            self.down.append(levels.level(ins, width, self.resolutions[i], f"down.{i}"))
            last = i == len(channels) - 1
            self.downsamples.append(nn.Identity() if last else nn.Conv2d(width, width, 3, stride=2, padding=1))
            previous = width
        return previous

    def _make_up_path(self, channels, blocks_per_level: int, levels: _LevelMaker, previous: int) -> None:
        """`self.up` (a Level per width, narrowest first) and `self.upsamples` (a conv to the next
        level's width after each but the last, which reads the upsampled map); `previous` is the
        width leaving the middle."""
        self.up = nn.ModuleList()
        self.upsamples = nn.ModuleList()
        for i in reversed(range(len(channels))):
            width = channels[i]
            # every block takes one skip connection from the same level of the down path
            ins = [previous + width] + [2 * width] * (blocks_per_level - 1)
            self.up.append(levels.level(ins, width, self.resolutions[i], f"up.{i}"))
            self.upsamples.append(nn.Conv2d(width, channels[i - 1], 3, padding=1) if i > 0 else nn.Identity())
            previous = channels[i - 1] if i > 0 else width

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor | None = None,
        attention_controller: AttentionController | None = None,
        step: int | None = None,
        num_steps: int | None = None,
        conditional: slice = slice(None),
    ) -> torch.Tensor:
        """sample: (B, 3, R, R) noisy images, or with self_conditioning (B, 6, R, R): the noisy
        images, then the model's previous estimate of the clean images (a 3-channel sample reads
        as an estimate of zeros, "none yet"); timestep: (B,) or a scalar;
        encoder_hidden_states: (B, T, D) text-token embeddings; encoder_attention_mask: (B, T)
        bool, True for tokens the cross-attention may read; attention_controller: an optional
        `AttentionController` that sees (and may edit) every cross-attention's probabilities;
        step, num_steps, conditional: the sampler's step index, its number of steps and the
        conditional rows of the batch, passed on to the controller. Returns (B, 3, R, R)."""
        B = sample.shape[0]
        timestep = torch.as_tensor(timestep, device=sample.device).reshape(-1).expand(B)
        t_emb = get_timestep_embedding(timestep, self.config.channels[0], flip_sin_to_cos=True, downscale_freq_shift=0)
        t_emb = self.time_mlp(t_emb.to(sample.dtype))  # (B, time_dim)
        if self.text_to_time is not None:
            t_emb = t_emb + self.text_to_time(pooled_states(encoder_hidden_states, encoder_attention_mask))
        call = None
        if attention_controller is not None:
            call = AttentionCall(attention_controller, step, num_steps, conditional)
        attention_args = (encoder_hidden_states, encoder_attention_mask, call)

        def run_level(level: Level, h: torch.Tensor, skips: list | None) -> tuple[torch.Tensor, list]:
            outputs = []
            for i, resnet in enumerate(level.resnets):
                if skips is not None:
                    h = torch.cat([h, skips.pop()], dim=1)
                h = resnet(h, t_emb)
                if level.attentions is not None:
                    h = level.attentions[i](h, *attention_args)
                outputs.append(h)
            return h, outputs

        if self.config.self_conditioning and sample.shape[1] == self.config.in_channels:
            sample = torch.cat([sample, torch.zeros_like(sample)], dim=1)
        h = self.conv_in(sample)
        skips = []
        for level, downsample in zip(self.down, self.downsamples):
            h, outputs = run_level(level, h, None)
            skips.extend(outputs)
            h = downsample(h)

        h = self.mid_resnet1(h, t_emb)
        h = self.mid_attention(h, *attention_args)
        h = self.mid_resnet2(h, t_emb)

        for level, upsample in zip(self.up, self.upsamples):
            h, _ = run_level(level, h, skips)
            if not isinstance(upsample, nn.Identity):
                h = upsample(F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return self.conv_out(F.silu(self.norm_out(h)))


def unet_settings(cfg, context_dim: int, value_context_start: int = 0) -> dict:
    """`UNet` keyword arguments for a config (`diffusion.config.Config`): the image side from
    `data.resolution`, the rest from the `model` section. context_dim: width of the text
    embeddings; value_context_start: where the token embeddings start in them, for
    `model.values_from_token_embeddings` (0 otherwise)."""
    model = cfg.model
    return dict(
        sample_size=cfg.data.resolution,
        channels=tuple(model.channels),
        blocks_per_level=model.blocks_per_level,
        attention_resolutions=tuple(model.attention_resolutions),
        attention_heads=model.attention_heads,
        context_dim=context_dim,
        dropout=model.dropout,
        position_embedding=model.position_embedding,
        value_context_start=value_context_start if model.values_from_token_embeddings else 0,
        value_context_resolutions=None
        if model.token_value_resolutions is None
        else tuple(model.token_value_resolutions),
        self_conditioning=model.self_conditioning,
        pooled_text=model.pooled_text,
    )


def pooled_states(states: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
    """(B, T, D) text states -> (B, D): their mean over the tokens cross-attention may read."""
    if key_mask is None:
        return states.mean(1)
    weights = key_mask.to(states.dtype)[..., None]  # (B, T, 1)
    return (states * weights).sum(1) / weights.sum(1).clamp(min=1)


def estimate_clean(
    prediction: torch.Tensor, noisy: torch.Tensor, alphas_cumprod: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """The clean image a prediction implies, clamped to [-1, 1]: prediction and noisy (B, C, R, R),
    the noisy images in DDPM scale (x_t = sqrt(a) x0 + sqrt(1 - a) eps); alphas_cumprod (B,) the
    a of each row's timestep."""
    a = alphas_cumprod.to(noisy.device, torch.float32).reshape(-1, 1, 1, 1)
    prediction, noisy = prediction.float(), noisy.float()
    if prediction_type == "v_prediction":
        clean = a.sqrt() * noisy - (1 - a).sqrt() * prediction
    else:
        clean = (noisy - (1 - a).sqrt() * prediction) / a.sqrt()
    return clean.clamp(-1, 1)
