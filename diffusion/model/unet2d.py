"""`model.kind: unet2d`: a small diffusers `UNet2DConditionModel` in place of this project's UNet.

The same job as model/unet.py (pixel-space images, text states from the same CLIP, v or epsilon
out) and the same forward signature, so training, the grounding loss, the pipeline, evaluate.py
and the editor call it as they call `UNet`. The controllers reach its cross-attention through
diffusers' attention processors (diffusion/model/diffusers_adapter.py), not through a hook of
its own: this model is where the adapter meets real learnt attention.

    image (B, 3, R, R) -> UNet2DConditionModel: down_blocks (CrossAttnDownBlock2D at the sides in
    attention_resolutions, DownBlock2D elsewhere), mid_block (always cross-attention), up_blocks
    mirrored -> (B, 3, R, R)

What it lacks beside this project's UNet: no 2D position embedding in its transformer blocks
(diffusers has none) and no values read from the token embeddings alone. Its sites are named
by module, e.g. "down_blocks.1.attentions.0.transformer_blocks.0.attn2".
"""

from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

from diffusion.model.attention import AttentionCall, AttentionController
from diffusion.model.diffusers_adapter import controlled


class DiffusersUNet(ModelMixin, ConfigMixin):
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
        self_conditioning: bool = False,
    ):
        """The arguments mean what they mean for `UNet` (model/unet.py): sample_size the image side,
        channels the width of each level (level i at sample_size / 2**i), attention_resolutions the
        sides whose levels carry transformer blocks (the middle always has one), attention_heads
        heads per attention layer, context_dim the width of the text states, self_conditioning the
        previous clean estimate as `in_channels` more input channels."""
        super().__init__()
        sides = [sample_size // 2**i for i in range(len(channels))]
        attends = [side in attention_resolutions for side in sides]
        self.unet = UNet2DConditionModel(
            sample_size=sample_size,
            in_channels=in_channels * (2 if self_conditioning else 1),
            out_channels=out_channels,
            down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attends),
            up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attends)),
            block_out_channels=tuple(channels),
            layers_per_block=blocks_per_level,
            norm_num_groups=8,
            cross_attention_dim=context_dim,
            # diffusers' `attention_head_dim` is the number of heads here (its docs say so).
            attention_head_dim=attention_heads,
            dropout=dropout,
        )

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
        """As `UNet.forward`: sample (B, 3, R, R) (or (B, 6, R, R) with self_conditioning),
        timestep (B,) or a scalar, encoder_hidden_states (B, T, D), encoder_attention_mask (B, T)
        bool (True: a key the cross-attention may read; diffusers adds -10000 to the others'
        scores), attention_controller with step, num_steps, conditional (the adapter hands them to
        it at every cross-attention layer). Returns (B, 3, R, R)."""
        if self.config.self_conditioning and sample.shape[1] == self.config.in_channels:
            sample = torch.cat([sample, torch.zeros_like(sample)], dim=1)
        adapter = controlled(self.unet).install()
        adapter.call = None
        if attention_controller is not None:
            adapter.call = AttentionCall(attention_controller, step, num_steps, conditional)
        try:
            return self.unet(
                sample,
                timestep,
                encoder_hidden_states,
                encoder_attention_mask=encoder_attention_mask,
                return_dict=False,
            )[0]
        finally:
            adapter.call = None


def unet2d_settings(cfg, context_dim: int) -> dict:
    """`DiffusersUNet` keyword arguments for a config (`diffusion.config.Config`), as
    `unet_settings` gives `UNet`'s: the image side from `data.resolution`, the rest from `model`."""
    model = cfg.model
    return dict(
        sample_size=cfg.data.resolution,
        channels=tuple(model.channels),
        blocks_per_level=model.blocks_per_level,
        attention_resolutions=tuple(model.attention_resolutions),
        attention_heads=model.attention_heads,
        context_dim=context_dim,
        dropout=model.dropout,
        self_conditioning=model.self_conditioning,
    )
