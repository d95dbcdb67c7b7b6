"""The project's prompt tools on stock diffusers pipelines (diffusion/sampling/stock.py, through
diffusion/model/diffusers_adapter.py): tiny Stable Diffusion 1.x- and SDXL-shaped pipelines
built from configs with random weights and locally fitted tokenizers, saved with save_pretrained
and loaded back from the folder, as a user's local model is."""

import json

import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from diffusion.control.controllers import AttentionRecorder, AttentionReweighter, LocalBlend
from diffusion.control.prompts import parse_prompt
from diffusion.control.weighting import Weighting, condition, token_weights
from diffusion.errors import UserError
from diffusion.model.attention import AttentionCall, AttentionController
from diffusion.model.diffusers_adapter import AttentionAdapter, check_supported
from diffusion.sampling.settings import SamplingSettings
from diffusion.sampling.stock import StockPipeline, load_pipeline, pooled_condition, stock_sampler
from diffusion.training.clip import clip_text_config, fit_tokenizer

TOKENS = 12  # not 77: nothing may assume Stable Diffusion's length
CAPTIONS = [
    f"a {colour} {shape} on the {side}"
    for colour in ("red", "green", "blue", "yellow")
    for shape in ("circle", "square", "triangle")
    for side in ("left", "right")
]
SCHEDULER = {  # Stable Diffusion's noise schedule
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "steps_offset": 1,
    "clip_sample": False,
    "set_alpha_to_one": False,
}
PLAIN = SamplingSettings(steps=3, guidance=4.0, guidance_cutoff=1.0, mixed_precision="no")


def tiny_unet(cross_attention_dim: int, **xl) -> UNet2DConditionModel:
    """Cross-attention at two resolutions (8 and 4 px latents) and in the middle block."""
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=4,
        norm_num_groups=4,
        **xl,
    )


def tiny_vae() -> AutoencoderKL:
    torch.manual_seed(1)
    return AutoencoderKL(
        block_out_channels=(8, 8),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=16,
    )


@pytest.fixture(scope="session")
def stock_folders(tmp_path_factory):
    """{"sd": folder, "sdxl": folder}: tiny pipelines written with save_pretrained."""
    root = tmp_path_factory.mktemp("stock")
    tokenizer = fit_tokenizer(CAPTIONS * 4, vocab_size=600, model_max_length=TOKENS)
    torch.manual_seed(2)
    text_encoder = CLIPTextModel(clip_text_config(tokenizer, 16, 2, 2))
    sd = StableDiffusionPipeline(
        vae=tiny_vae(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=tiny_unet(16),
        scheduler=DDIMScheduler(**SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    sd.save_pretrained(root / "sd")
    torch.manual_seed(3)
    text_encoder_2 = CLIPTextModelWithProjection(clip_text_config(tokenizer, 24, 2, 2, projection_dim=20))
    xl = StableDiffusionXLPipeline(
        vae=tiny_vae(),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=tiny_unet(
            16 + 24,
            addition_embed_type="text_time",
            addition_time_embed_dim=4,
            projection_class_embeddings_input_dim=20 + 6 * 4,
        ),
        scheduler=DDIMScheduler(**SCHEDULER),
    )
    xl.save_pretrained(root / "sdxl")
    return {"sd": root / "sd", "sdxl": root / "sdxl"}


@pytest.fixture(scope="module", params=["sd", "sdxl"])
def stock(request, stock_folders):
    """(StockPipeline, the same folder loaded as a plain diffusers pipeline)."""
    folder = stock_folders[request.param]
    wrapped = load_pipeline(folder, device="cpu", mixed_precision="no")
    plain = type(wrapped.pipe).from_pretrained(folder)
    plain.set_progress_bar_config(disable=True)
    return wrapped, plain


def stock_images(plain, prompts, seeds, settings=PLAIN, **keywords):
    """The plain diffusers pipeline's own images (B, 3, H, W) for `prompts`."""
    plain.scheduler = stock_sampler(settings.sampler, plain.scheduler.config)
    return plain(
        prompts,
        num_inference_steps=settings.steps,
        guidance_scale=settings.guidance,
        generator=[torch.Generator().manual_seed(s) for s in seeds],
        output_type="pt",
        **keywords,
    ).images


class Capture(AttentionController):
    """Keeps the conditional rows' probabilities of every call at the sites `wanted` says, by
    (layer, step), as the controllers before it in a chain left them."""

    def __init__(self, wanted=lambda site: True):
        self.wanted = wanted
        self.seen = {}

    def wants(self, site):
        return self.wanted(site)

    def process(self, site, probabilities):
        self.seen[site.name, site.step] = probabilities[site.conditional].clone()


# ---- (a) no controller, or every weight 1: the stock pipeline's images --------------------------
def test_with_no_controller_or_every_weight_1_the_images_are_the_stock_pipelines_bit_for_bit(stock):
    wrapped, plain = stock
    prompts = ["a red circle on the left", "a blue square on the right"]
    expected = stock_images(plain, prompts, [7, 7])
    for prompt, maps in ((prompts, False), (["a (red:1) circle on the left", prompts[1]], True)):
        out = wrapped(prompt, seed=7, settings=PLAIN, attention_maps=maps, output_type="pt", progress=False)
        assert torch.equal(out.images, expected)
    pil = wrapped(prompts, seed=7, settings=PLAIN, progress=False).images
    plain.scheduler = stock_sampler(PLAIN.sampler, plain.scheduler.config)
    generators = [torch.Generator().manual_seed(7) for _ in prompts]
    stock_pil = plain(prompts, num_inference_steps=3, guidance_scale=4.0, generator=generators).images
    assert [a.tobytes() for a in pil] == [b.tobytes() for b in stock_pil]


def test_a_negative_prompt_and_the_guidance_cutoff_act_as_in_the_stock_pipeline(stock):
    wrapped, plain = stock
    prompt, negative = "a red circle on the left", "a blue square"
    settings = PLAIN.but(negative_prompt=negative)
    expected = stock_images(plain, [prompt], [1], settings, negative_prompt=[negative])
    assert torch.equal(wrapped(prompt, seed=1, settings=settings, output_type="pt", progress=False).images, expected)
    # guidance for the first 2 of 3 steps: the last step runs the conditional rows alone
    cut = wrapped(prompt, seed=1, settings=PLAIN.but(guidance_cutoff=0.5), output_type="pt", progress=False)
    assert not torch.equal(cut.images, stock_images(plain, [prompt], [1]))
    rows = []
    hook = wrapped.unet.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
    try:
        wrapped(prompt, seed=1, settings=PLAIN.but(guidance_cutoff=0.5), output_type="pt", progress=False)
    finally:
        hook.remove()
    assert rows == [2, 2, 1]


# ---- (b) the maps: softmax(QK^T / sqrt(d)) of each layer, words merged from their tokens ----------
def test_recorded_maps_are_the_layers_softmax_and_a_words_map_merges_its_tokens(stock):
    wrapped, _ = stock
    layer = wrapped.adapter.layers[-1]  # the last up block's
    inputs = {}
    attention = wrapped.unet.get_submodule(layer)

    def keep_first_inputs(module, args, kwargs):
        inputs.setdefault("x", (args[0], kwargs["encoder_hidden_states"]))

    hook = attention.register_forward_pre_hook(keep_first_inputs, with_kwargs=True)
    capture = Capture(lambda site: site.name == layer)
    prompt = "a purple circle on the left"  # "purple" is not in the tokenizer's captions: several tokens
    try:
        out = wrapped(prompt, seed=0, settings=PLAIN, attention_controller=capture, attention_maps=True, progress=False)
    finally:
        hook.remove()
    hidden, context = inputs["x"]  # the first step's, both halves of the guided batch
    B, N, _ = hidden.shape
    heads = attention.heads
    q = attention.to_q(hidden).view(B, N, heads, -1).transpose(1, 2)
    k = attention.to_k(context).view(B, context.shape[1], heads, -1).transpose(1, 2)
    by_hand = (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).softmax(-1)[1:]  # the conditional row
    assert torch.allclose(capture.seen[layer, 0], by_hand, atol=1e-6)
    assert by_hand.shape[-1] == TOKENS

    offsets = wrapped.encoder.offsets([prompt])[0]
    purple = [t for t, (start, end) in enumerate(offsets.tolist()) if end > start and prompt[start:end] in "purple"]
    assert len(purple) > 1
    recorder = AttentionRecorder(wrapped.map_size)
    wrapped(prompt, seed=0, settings=PLAIN, attention_controller=recorder, progress=False)
    token_maps = recorder.token_maps()[0]  # (T, 8, 8): the latents' side
    word_maps = out.attention_maps[0]
    assert list(word_maps) == ["a", "purple", "circle", "on", "the", "left"]
    assert torch.allclose(word_maps["purple"], token_maps[purple].sum(0), atol=1e-6)
    assert word_maps["purple"].shape == (8, 8)


# ---- (c) weights: attention mode masks a key at 0; embedding mode interpolates the states --------
def unet_call(unet, wrapped, context, mask=None):
    """One call of the UNet on fixed noise with `context`; SDXL's added conditions fixed too."""
    torch.manual_seed(0)
    x = torch.randn(context.shape[0], 4, 8, 8)
    added = None
    if unet.config.addition_embed_type == "text_time":
        added = {"text_embeds": torch.randn(context.shape[0], 20), "time_ids": torch.randn(context.shape[0], 6)}
    return unet(x, 500, context, encoder_attention_mask=mask, added_cond_kwargs=added).sample


def test_weight_0_in_attention_mode_is_masking_that_key(stock):
    wrapped, _ = stock
    unet = wrapped.unet
    context, _ = wrapped.encoder.encode(["a red circle on the left"])
    weights = torch.ones(1, TOKENS)
    weights[0, 2] = 0.0  # "red"
    with torch.no_grad():
        masked = unet_call(unet, wrapped, context, mask=(weights != 0).long())
        wrapped.adapter.install()
        try:
            wrapped.adapter.call = AttentionCall(AttentionReweighter(weights), 0, 1)
            reweighted = unet_call(unet, wrapped, context)
        finally:
            wrapped.adapter.remove()
        plain = unet_call(unet, wrapped, context)
    assert torch.allclose(reweighted, masked, atol=1e-5)
    assert not torch.allclose(reweighted, plain, atol=1e-3)


def test_embedding_mode_passes_the_interpolated_states_to_the_stock_pipeline(stock):
    wrapped, plain = stock
    text = "a red circle on the left"
    weighting = Weighting("embedding", steps=(0.0, 1.0), context="keep")
    settings = PLAIN.but(weighting=weighting)
    out = wrapped("a (red:0.4) circle on the left", seed=2, settings=settings, output_type="pt", progress=False)
    states, _ = wrapped.encoder.encode([text])
    empty, _ = wrapped.encoder.encode([""])
    weights = torch.ones(1, TOKENS, 1)
    weights[0, 2] = 0.4
    keywords = {"prompt_embeds": empty + weights * (states - empty)}
    if wrapped.encoder.xl:
        keywords["pooled_prompt_embeds"] = wrapped.encoder.pooled([text])
    assert torch.equal(out.images, stock_images(plain, None, [2], **keywords))
    assert not torch.equal(out.images, stock_images(plain, [text], [2]))


def test_sdxls_pooled_embedding_fades_the_down_weighted_words_with_context_fade(stock_folders):
    wrapped = load_pipeline(stock_folders["sdxl"], device="cpu", mixed_precision="no")
    encoder, text = wrapped.encoder, "a red circle on the left"
    weights = token_weights([parse_prompt("a (red:0) circle on the left")], encoder.offsets([text]))
    assert torch.equal(
        pooled_condition(encoder, [text], weights, Weighting()), encoder.pooled(["a circle on the left"])
    )
    assert torch.equal(pooled_condition(encoder, [text], weights, Weighting(context="keep")), encoder.pooled([text]))
    states, _ = condition(encoder, [text], weights, Weighting(), encoded=encoder.encode([text]))
    assert states.shape[-1] == 16 + 24  # both encoders' features at each position


# ---- (d) a swap: the source's maps in the edit steps, the edit's own after them --------------------
def test_a_swap_injects_the_sources_maps_in_its_edit_steps_and_not_after(stock):
    wrapped, _ = stock
    settings = PLAIN.but(steps=4, edit_steps=0.5, keep_layout=False)
    plan = wrapped.swap_plan([("a red circle on the left", "a red square on the left")], keep_layout=False)
    capture = Capture()
    images, _ = wrapped.sample_batch(plan.prompts, [3, 3], settings, attention_controller=capture, swap=plan)
    assert images.shape == (2, 3, 16, 16)
    mapping = plan.mapping[0]
    kept = mapping >= 0
    for (layer, step), probabilities in capture.seen.items():
        source, edit = probabilities[0], probabilities[1]  # (heads, N, T)
        from_source = source[..., mapping.clamp(min=0)]
        if step < 2:  # injected: the source's maps exactly
            assert torch.equal(edit[..., kept], from_source[..., kept]), (layer, step)
        else:  # the edit's own
            assert not torch.allclose(edit[..., kept], from_source[..., kept], atol=1e-4), (layer, step)
    assert {step for _, step in capture.seen} == {0, 1, 2, 3}


def test_local_blend_acts_on_the_latents_at_their_resolution(stock):
    wrapped, _ = stock
    source, edit = wrapped.swap(
        "a red circle on the left",
        "a red square on the left",
        PLAIN.but(local_blend=True),
        seed=4,
        progress=False,
    )
    assert source.images[0].size == edit.images[0].size == (16, 16)
    assert source.settings["local_blend"] is True
    plan = wrapped.swap_plan([("a red circle on the left", "a blue circle on the left")])
    blend = LocalBlend(plan.changed, wrapped.map_size)
    seen = []

    def spy(pipe, step, timestep, tensors):
        seen.append(tensors["latents"].shape)
        out = blend(pipe, step, timestep, tensors)
        seen.append(blend.region().shape)
        return out

    wrapped.sample_batch(plan.prompts, [4, 4], PLAIN, attention_controller=blend, swap=plan, callback_on_step_end=spy)
    assert seen[:2] == [(2, 4, 8, 8), (1, 8, 8)]


# ---- (e) memory ------------------------------------------------------------------------------------
def test_recording_memory_does_not_grow_with_the_number_of_steps(stock):
    wrapped, _ = stock
    sizes = []
    for steps in (2, 8):
        recorder = AttentionRecorder(wrapped.map_size)
        wrapped("a red circle", settings=PLAIN.but(steps=steps), attention_controller=recorder, progress=False)
        sizes.append(sum(t.numel() * t.element_size() for t in recorder._sums.values()))
        assert recorder.calls == steps * len(wrapped.adapter.layers)
    assert sizes[0] == sizes[1] > 0


# ---- (f) the command lines and the editor on a stock folder; SD3 gets one line ------------------
def test_sample_py_draws_weights_maps_and_swaps_from_a_stock_folder(stock_folders, tmp_path, capsys):
    import sample

    for kind, folder in stock_folders.items():
        out = tmp_path / kind / "grid.png"
        common = ["--model", str(folder), "--steps", "2", "--mixed-precision", "no", "--device", "cpu"]
        sample.main(
            [
                *common,
                "a (red:2) circle on the left",
                "-n",
                "2",
                "--out",
                str(out),
                "--attention",
                str(out.parent / "maps"),
            ]
        )
        assert (out.parent / "grid-000.png").is_file() and (out.parent / "grid-001.png").is_file()
        assert sorted(p.name for p in (out.parent / "maps").glob("*.safetensors")) == [
            "grid-000.safetensors",
            "grid-001.safetensors",
        ]
        sample.main([*common, "a red circle", "--edit", "a blue circle", "-n", "1", "--local-blend", "--out", str(out)])
        assert (out.parent / "grid-edit-000.png").is_file()
    assert "wrote" in capsys.readouterr().out


def test_the_editor_renders_and_swaps_on_a_stock_folder(stock_folders):
    from diffusion.editor import service

    editor = service.Editor.load(stock_folders["sdxl"], device="cpu")
    assert not editor.compilable and editor.status().startswith("renders: uncompiled (UNet2DConditionModel")
    result = editor.render("a (red:0.5) circle on the left", service.Settings(steps=2))
    assert len(result.output.images) == 1 and result.output.images[0].size == (16, 16)
    assert set(result.maps(0, 2)) == {"a", "red", "circle", "on", "the", "left"}
    source, edit = editor.swap("a red circle", "a blue circle", 0.5, service.Settings(steps=2))
    assert edit.output.images[0].size == (16, 16)


def test_the_app_builds_its_page_on_a_stock_folder(stock_folders):
    pytest.importorskip("gradio")
    import app
    from diffusion.editor import service

    args = app.parse_arguments(["--model", str(stock_folders["sd"]), "--device", "cpu"])
    editor = service.Editor.load(args.model, device=args.device, mixed_precision=args.mixed_precision)
    first = editor.render("a red circle", service.Settings(steps=2))
    assert app.build_page(editor, first) is not None


def sd3_folder(path):
    path.mkdir()
    index = {
        "_class_name": "StableDiffusion3Pipeline",
        "_diffusers_version": "0.42.1",
        "transformer": ["diffusers", "SD3Transformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (path / "model_index.json").write_text(json.dumps(index))
    return path


def test_an_sd3_folder_or_transformer_gets_one_line(tmp_path, capsys):
    from diffusers import SD3Transformer2DModel

    import sample

    folder = sd3_folder(tmp_path / "sd3")
    with pytest.raises(UserError, match="SD3Transformer2DModel .* not supported yet"):
        load_pipeline(folder)
    with pytest.raises(SystemExit) as exit_:
        sample.main(["--model", str(folder), "a red circle", "--out", str(tmp_path / "grid.png")])
    assert exit_.value.code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "not supported yet" in error and "UNet2DConditionModel" in error
    transformer = SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        num_layers=1,
        attention_head_dim=4,
        num_attention_heads=2,
        joint_attention_dim=8,
        caption_projection_dim=8,
        pooled_projection_dim=8,
        out_channels=4,
    )
    for check in (check_supported, AttentionAdapter):  # the adapter said "no cross-attention layer"
        with pytest.raises(UserError, match="SD3Transformer2DModel .* not supported yet"):
            check(transformer)


def test_another_diffusers_pipeline_folder_gets_one_line(tmp_path, capsys):
    import sample

    folder = tmp_path / "ddpm"
    folder.mkdir()
    (folder / "model_index.json").write_text(
        json.dumps({"_class_name": "DDPMPipeline", "unet": ["diffusers", "UNet2DModel"]})
    )
    with pytest.raises(UserError, match="holds a DDPMPipeline; the attention tools load StableDiffusionPipeline"):
        load_pipeline(folder)
    with pytest.raises(SystemExit) as exit_:
        sample.main(["--model", str(folder), "a red circle", "--out", str(tmp_path / "grid.png")])
    assert exit_.value.code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "DDPMPipeline" in error


def test_the_adapter_refuses_a_model_without_processors_or_cross_attention_in_one_line():
    with pytest.raises(UserError, match="Linear is not a diffusers UNet with attention processors"):
        AttentionAdapter(torch.nn.Linear(2, 2))
    torch.manual_seed(0)
    no_cross = UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        mid_block_type=None,
        norm_num_groups=4,
    )
    with pytest.raises(UserError, match="UNet2DConditionModel has no cross-attention layer for the adapter"):
        AttentionAdapter(no_cross)


def test_sdxl_tokenizers_that_split_a_prompt_differently_are_one_line(stock_folders):
    plain = StableDiffusionXLPipeline.from_pretrained(stock_folders["sdxl"])
    plain.tokenizer_2 = fit_tokenizer(["a red circle"] * 4, vocab_size=520, model_max_length=TOKENS)
    with pytest.raises(UserError, match="two tokenizers split this prompt differently"):
        StockPipeline(plain).encoder.offsets(["a green triangle on the right"])
