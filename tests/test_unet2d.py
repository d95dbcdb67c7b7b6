"""model.kind unet2d: a diffusers UNet2DConditionModel trained, exported, loaded and controlled
through the attention adapter (diffusion/model/unet2d.py, diffusion/model/diffusers_adapter.py)."""

import copy
import json
import shutil

import pytest
import torch

from diffusion.checkpoint import load_checkpoint
from diffusion.config import config_from_dict
from diffusion.control.controllers import AttentionRecorder, AttentionReweighter
from diffusion.editor import service
from diffusion.errors import UserError
from diffusion.model.attention import AttentionController, AttentionSite
from diffusion.model.text_encoder import TextEncoder
from diffusion.model.unet import UNet
from diffusion.model.unet2d import DiffusersUNet
from diffusion.sampling.pipeline import Pipeline
from diffusion.training.grounding import GroundingLoss
from diffusion.training.loop import check_resume, train

LAYER = "down_blocks.1.attentions.0.transformer_blocks.0.attn2"  # a cross-attention at 8 px
T, D = 6, 24  # text tokens and their width


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    model = DiffusersUNet(
        sample_size=16, channels=(16, 32), attention_resolutions=(8,), attention_heads=2, context_dim=D
    )
    for p in model.parameters():  # diffusers zero-initialises conv_out: random weights so outputs differ
        p.data.normal_(0, 0.2)
    return model.eval()


def inputs(rows: int = 2):
    generator = torch.Generator().manual_seed(1)
    sample = torch.randn(rows, 3, 16, 16, generator=generator)
    context = torch.randn(rows, T, D, generator=generator)
    mask = torch.ones(rows, T, dtype=torch.bool)
    mask[:, -2:] = False  # the last two tokens are padding
    return sample, torch.tensor([500] * rows), context, mask


class Sites(AttentionController):
    """Every site it is shown, with its probabilities (detached)."""

    def __init__(self, layer: str | None = None):
        self.layer, self.seen = layer, {}

    def wants(self, site: AttentionSite) -> bool:
        return self.layer is None or site.name == self.layer

    def process(self, site: AttentionSite, probabilities: torch.Tensor) -> None:
        self.seen[site.name] = (site, probabilities.detach())


class OneLayerRecorder(AttentionRecorder):
    def wants(self, site: AttentionSite) -> bool:
        return site.name == LAYER


def test_the_controller_sees_every_cross_attention_with_its_resolution_and_step(unet):
    sites = Sites()
    with torch.no_grad():
        unet(*inputs(), attention_controller=sites, step=3, num_steps=10, conditional=slice(1, None))
    assert set(sites.seen) == {
        "down_blocks.1.attentions.0.transformer_blocks.0.attn2",
        "mid_block.attentions.0.transformer_blocks.0.attn2",
        "up_blocks.0.attentions.0.transformer_blocks.0.attn2",
        "up_blocks.0.attentions.1.transformer_blocks.0.attn2",
    }
    for site, probabilities in sites.seen.values():
        assert site.resolution == (8, 8) and (site.step, site.num_steps, site.conditional) == (3, 10, slice(1, None))
        assert probabilities.shape == (2, 2, 64, T)
    assert unet.unet._attention_adapter.call is None  # cleared after the call


def test_recorded_maps_are_softmax_of_q_k_over_sqrt_d_at_one_layer(unet):
    captured = {}
    attn = unet.unet.get_submodule(LAYER)

    def keep(module, args, kwargs):
        captured["hidden"] = args[0] if args else kwargs["hidden_states"]
        captured["context"] = kwargs["encoder_hidden_states"]

    hook = attn.register_forward_pre_hook(keep, with_kwargs=True)
    recorder = OneLayerRecorder(8)
    sample, timestep, context, mask = inputs()
    try:
        with torch.no_grad():
            unet(sample, timestep, context, mask, attention_controller=recorder)
    finally:
        hook.remove()
    with torch.no_grad():
        B, N, _ = captured["hidden"].shape
        q = attn.to_q(captured["hidden"]).view(B, N, 2, -1).transpose(1, 2)  # (B, heads, N, d)
        k = attn.to_k(captured["context"]).view(B, T, 2, -1).transpose(1, 2)  # (B, heads, T, d)
        scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
        by_hand = scores.masked_fill(~mask[:, None, None, :], float("-inf")).softmax(-1)
    expected = by_hand.mean(1).transpose(1, 2).reshape(B, T, 8, 8)
    assert recorder.calls == 1
    torch.testing.assert_close(recorder.token_maps(), expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_masked_keys_get_probability_zero_and_do_not_reach_the_output(unet, dtype):
    sample, timestep, context, mask = inputs()
    sites = Sites()
    other = context.clone()
    other[:, -2:] = 3 * torch.randn(2, 2, D)  # what the masked keys hold must not matter
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        unet(sample, timestep, context, mask, attention_controller=sites)
        plain = unet(sample, timestep, context, mask)  # the fused kernel: no controller
        changed = unet(sample, timestep, other, mask)
    for _, probabilities in sites.seen.values():
        assert (probabilities[..., -2:] == 0).all()
        torch.testing.assert_close(probabilities.float().sum(-1), torch.ones(probabilities.shape[:-1]))
    assert torch.equal(plain, changed)


def test_weight_zero_in_attention_mode_equals_masking_that_key(unet):
    sample, timestep, context, mask = inputs()
    weights = torch.ones(2, T)
    weights[:, 2] = 0
    masked = mask.clone()
    masked[:, 2] = False
    with torch.no_grad():
        weighted = unet(sample, timestep, context, mask, attention_controller=AttentionReweighter(weights))
        without = unet(sample, timestep, context, masked)
        plain = unet(sample, timestep, context, mask)
    torch.testing.assert_close(weighted, without, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(weighted, plain, atol=1e-3)  # the key mattered


def test_the_grounding_loss_trains_the_cross_attention_through_the_adapter(unet):
    model = copy.deepcopy(unet).train()
    grounding = GroundingLoss({8}, pixel=True)
    token_object = torch.full((2, T), -1)
    token_object[:, 1:3] = 0
    masks = torch.zeros(2, 1, 16, 16)
    masks[:, 0, :, :8] = 1
    grounding.set_batch(token_object, masks)
    sample, timestep, context, mask = inputs()
    model(sample, timestep, context, mask, attention_controller=grounding)
    assert len(grounding.terms) == 4  # every cross-attention at 8 px
    (grounding.loss() + grounding.pixel_loss()).backward()
    for name in ("down_blocks.1.attentions.0.transformer_blocks.0", "mid_block.attentions.0.transformer_blocks.0"):
        block = model.unet.get_submodule(name)
        assert block.attn2.to_k.weight.grad.abs().sum() > 0  # the maps' keys
    assert model.unet.conv_out.weight.grad is None  # after the last map: the loss reads maps only


def test_self_conditioning_reads_a_second_image():
    model = DiffusersUNet(
        sample_size=16, channels=(16, 32), attention_resolutions=(8,), context_dim=D, self_conditioning=True
    )
    assert model.unet.conv_in.in_channels == 6
    for p in model.parameters():
        p.data.normal_(0, 0.2)
    sample, timestep, context, mask = inputs()
    with torch.no_grad():
        alone = model(sample, timestep, context, mask)
        zeros = model(torch.cat([sample, torch.zeros_like(sample)], 1), timestep, context, mask)
    assert torch.equal(alone, zeros)


def test_bad_kinds_and_options_of_the_other_unet_are_one_line_errors(tiny_dict):
    tiny_dict["model"]["kind"] = "unet3d"
    with pytest.raises(UserError, match="model.kind must be one of unet, unet2d, got 'unet3d'"):
        config_from_dict(tiny_dict)
    tiny_dict["model"].update(kind="unet2d", values_from_token_embeddings=True)
    with pytest.raises(UserError, match="model.values_from_token_embeddings is an option of this project's UNet"):
        config_from_dict(tiny_dict)
    tiny_dict["model"].update(values_from_token_embeddings=False, pooled_text=True)
    with pytest.raises(UserError, match="model.pooled_text is an option of this project's UNet"):
        config_from_dict(tiny_dict)


@pytest.fixture(scope="module")
def unet2d_run(tmp_path_factory):
    """A finished 4-step tiny run of model.kind unet2d, grounding on (the shapes' masks)."""
    from tests.conftest import TINY

    values = copy.deepcopy(TINY)
    values["model"]["kind"] = "unet2d"
    out = tmp_path_factory.mktemp("unet2d") / "run"
    train(config_from_dict(values), out)
    return out


def test_a_unet2d_run_trains_with_grounding_and_exports_a_folder_that_loads(unet2d_run, tiny_model):
    model = unet2d_run / "model"
    assert json.loads((model / "unet" / "config.json").read_text())["_class_name"] == "DiffusersUNet"
    assert json.loads((model / "model_index.json").read_text())["unet"] == ["diffusion", "DiffusersUNet"]
    assert isinstance(Pipeline.from_pretrained(model, device="cpu").unet, DiffusersUNet)
    assert isinstance(Pipeline.from_pretrained(tiny_model, device="cpu").unet, UNet)  # the project's UNet still


def test_diffusers_loads_an_exported_unet2d(unet2d_run):
    from diffusers import DiffusionPipeline

    loaded = DiffusionPipeline.from_pretrained(unet2d_run / "model", trust_remote_code=True).to("cpu")
    assert isinstance(loaded, Pipeline) and isinstance(loaded.unet, DiffusersUNet)


def test_the_exported_unet2d_gives_the_images_of_the_trained_one(unet2d_run, tmp_path):
    loaded = Pipeline.from_pretrained(unet2d_run / "model", device="cpu", mixed_precision="no")
    model = DiffusersUNet.from_config(loaded.unet.config)
    state = load_checkpoint(unet2d_run / "checkpoints" / "step-000004")
    model.load_state_dict(state["ema"])  # the EMA weights are what is exported
    encoder = TextEncoder.from_pretrained(str(unet2d_run / "model"))
    in_memory = Pipeline.from_parts(model, encoder, loaded.scheduler_config, "cpu", mixed_precision="no")
    prompts = ["a (red:1.5) circle", "a blue square"]
    a = loaded(prompts, seed=3, steps=3, output_type="pt", progress=False)
    b = in_memory(prompts, seed=3, steps=3, output_type="pt", progress=False)
    assert torch.equal(a.images, b.images)
    loaded.save_pretrained(tmp_path / "again")
    again = Pipeline.from_pretrained(tmp_path / "again", device="cpu", mixed_precision="no")
    assert torch.equal(again(prompts, seed=3, steps=3, output_type="pt", progress=False).images, a.images)


def test_resuming_checks_the_kind_and_takes_checkpoints_from_before_it_for_unet(unet2d_run, run_copy, tiny_dict):
    with pytest.raises(UserError, match="other model.\\* settings"):
        check_resume(config_from_dict(tiny_dict), unet2d_run, "latest")  # kind unet
    state_file = run_copy / "checkpoints" / "step-000004" / "state.json"
    state = json.loads(state_file.read_text())
    del state["config"]["model"]["kind"]  # written before model.kind
    del state["config"]["model"]["pooled_text"]  # and before model.pooled_text
    state_file.write_text(json.dumps(state))
    assert check_resume(config_from_dict(tiny_dict), run_copy, "latest")["step"] == 4


def test_an_unknown_unet_class_in_a_folder_is_one_line(unet2d_run, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(unet2d_run / "model", folder)
    config = folder / "unet" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "_class_name": "UNet3DConditionModel"}))
    with pytest.raises(UserError, match="its UNet class 'UNet3DConditionModel' is none of UNet, DiffusersUNet"):
        Pipeline.from_pretrained(folder, device="cpu")


def test_the_editor_renders_a_unet2d_uncompiled_and_says_why(unet2d_run, capsys):
    editor = service.Editor.load(unet2d_run / "model", device="cpu", mixed_precision="no")
    assert editor.compile() == 0 and not editor.compiled
    assert "DiffusersUNet is not compiled: a diffusers UNet" in capsys.readouterr().out
    assert editor.status().startswith("renders: uncompiled (DiffusersUNet is not compiled")
    result = editor.render("a (red:0.5) circle", service.Settings(steps=2, seed=1))
    assert set(result.step_maps[0]) == {"a", "red", "circle"}


def test_sample_and_evaluate_accept_a_unet2d_folder(unet2d_run, tmp_path, run_cli):
    model = unet2d_run / "model"
    result = run_cli(
        "sample.py", "--model", model, "a (red:1.5) circle", "-n", "1", "--steps", "2",
        "--edit", "a blue circle", "--local-blend", "--attention", tmp_path / "maps", "--out", tmp_path / "grid.png",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "grid.png").is_file() and any((tmp_path / "maps").iterdir())
    out = tmp_path / "report.json"
    options = ["--n", "1", "--n-edit", "1", "--n-swap", "1", "--parts", "faithfulness,localisation,edit,swap"]
    result = run_cli("evaluate.py", "--model", model, *options, "--out", out)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(out.read_text())
    assert {"faithfulness", "localisation", "edit", "swap"} <= set(report)
