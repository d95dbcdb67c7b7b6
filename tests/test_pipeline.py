"""Tests for diffusion/sampling/pipeline.py against the tiny trained model of the session."""

import inspect
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion.control.prompts import parse_prompt
from diffusion.errors import UserError
from diffusion.images import to_pil, uint8_images
from diffusion.model.attention import AttentionController
from diffusion.sampling.pipeline import DEFAULT_GUIDANCE_CUTOFF, DEFAULT_SAMPLER, MapOptions, Pipeline
from diffusion.sampling.samplers import SAMPLERS, make_sampler, sampler_timesteps, set_sampler_timesteps
from diffusion.sampling.settings import SamplingSettings

PROMPTS = ["a red circle on the left", "a blue square"]


@pytest.fixture(scope="module")
def pipe(tiny_model):
    return Pipeline.from_pretrained(tiny_model, device="cpu")


def pixels(images):
    return np.stack([np.asarray(image) for image in images]).astype(int)


def test_a_copied_model_folder_loads_on_its_own(tiny_model, tmp_path, pipe):
    """The exported folder is self-contained: nothing from the run directory is needed."""
    alone = tmp_path / "elsewhere" / "model"
    shutil.copytree(tiny_model, alone)
    copy = Pipeline.from_pretrained(alone, device="cpu")
    assert copy.unet.config.sample_size == 16
    a = copy(PROMPTS[0], seed=3, steps=2, progress=False).images[0]
    b = pipe(PROMPTS[0], seed=3, steps=2, progress=False).images[0]
    assert np.array_equal(np.asarray(a), np.asarray(b))


def test_images_have_the_model_size_and_count(pipe):
    out = pipe(PROMPTS, num_images_per_prompt=3, seed=7, steps=2, progress=False)
    assert len(out.images) == 6
    assert all(
        isinstance(image, Image.Image) and image.size == (16, 16) and image.mode == "RGB" for image in out.images
    )
    assert out.prompts == [PROMPTS[0]] * 3 + [PROMPTS[1]] * 3
    assert out.seeds == [7, 8, 9, 7, 8, 9]
    assert {k: out.settings[k] for k in ("sampler", "steps", "guidance", "negative_prompt")} == {
        "sampler": "euler",
        "steps": 2,
        "guidance": 3.0,
        "negative_prompt": "",
    }


def test_a_single_prompt_string(pipe):
    out = pipe(PROMPTS[0], steps=2, progress=False)
    assert len(out.images) == 1 and out.prompts == [PROMPTS[0]] and out.seeds == [0]


@pytest.mark.parametrize("sampler", ["dpm++", "ddim", "ddpm", "euler"])
def test_every_sampler_gives_finite_images(pipe, sampler):
    x = pipe.denoise(PROMPTS, [0, 1], steps=3, sampler=sampler)
    assert x.shape == (2, 3, 16, 16)
    assert torch.isfinite(x).all()
    assert x.min() >= -1 and x.max() <= 1
    assert x.std() > 0.05  # not a constant image
    out = pipe(PROMPTS, steps=3, sampler=sampler, progress=False)
    assert out.settings["sampler"] == sampler and len(out.images) == 2


@pytest.mark.parametrize("steps", [10, 50])
def test_ddim_and_euler_take_the_same_ode_step(steps):
    """DDIM (eta 0) is Euler's method on the probability-flow ODE in sigma coordinates, so the
    two samplers must give the same images. Clipping DDIM's x0 estimate to [-1, 1] at every step
    (diffusers' clip_sample, on in the training scheduler's config) breaks this: with guidance the
    x0 estimate overshoots, and clipped it dragged faithfulness at 50 steps from 0.80 to 0.23."""
    # float32: the two differ only by rounding, which bf16 autocast would raise to 0.02
    small = Pipeline.from_pretrained(
        Path(__file__).parent / "assets" / "small-shapes", device="cpu", mixed_precision="no"
    )
    prompts, seeds = ["a red circle", "a blue square", "a green cross", "a yellow triangle"], [0, 1, 2, 3]
    ddim = small.denoise(prompts, seeds, steps=steps, sampler="ddim")
    euler = small.denoise(prompts, seeds, steps=steps, sampler="euler")
    assert (ddim - euler).abs().max() < 1e-3


@pytest.mark.parametrize("steps", [5, 20, 50, 250])
def test_every_sampler_starts_near_pure_noise_on_the_same_timesteps(pipe, steps):
    """diffusers' own DPM++ "leading" rule divides by steps + 1: at 250 steps it started at
    t = 750 from pure noise, which left grain and extra objects in every image."""
    expected = sampler_timesteps(steps, 1000)
    assert expected[0] >= 1000 - 1000 // steps and expected[-1] == 0 and len(expected) == steps
    for name in SAMPLERS:
        scheduler = make_sampler(name, pipe.scheduler_config)
        set_sampler_timesteps(scheduler, steps)
        assert scheduler.timesteps.tolist() == expected, name


def test_more_steps_than_training_timesteps_is_a_clear_error(pipe):
    with pytest.raises(UserError, match="between 1 and the model's 1000 training timesteps"):
        pipe(PROMPTS[0], steps=1001, progress=False)


def test_samplers_are_the_four_documented_ones():
    assert set(SAMPLERS) == {"dpm++", "ddim", "ddpm", "euler"}


def test_the_command_lines_list_the_pipeline_samplers_and_default():
    from diffusion.cli import SAMPLING_OPTIONS
    from diffusion.sampling.settings import SamplingSettings

    option = SAMPLING_OPTIONS["--sampler"]
    assert set(option["choices"]) == set(SAMPLERS)
    assert option["default"] == SamplingSettings().sampler == DEFAULT_SAMPLER == "euler"
    assert inspect.signature(Pipeline.__call__).parameters["sampler"].default == DEFAULT_SAMPLER


def test_same_seed_same_images_different_seed_different_images(pipe):
    a = pixels(pipe(PROMPTS, num_images_per_prompt=2, seed=11, steps=3, sampler="ddpm", progress=False).images)
    b = pixels(pipe(PROMPTS, num_images_per_prompt=2, seed=11, steps=3, sampler="ddpm", progress=False).images)
    c = pixels(pipe(PROMPTS, num_images_per_prompt=2, seed=12, steps=3, sampler="ddpm", progress=False).images)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    # image i of a prompt uses seed + i: seed 12's first image is seed 11's second
    assert np.array_equal(c[0], a[1])
    assert not np.array_equal(a[0], a[1])


@pytest.mark.parametrize("sampler", ["dpm++", "ddpm"])
def test_an_image_does_not_depend_on_the_batch_size(pipe, sampler):
    kwargs = dict(num_images_per_prompt=3, seed=0, steps=3, sampler=sampler, progress=False)
    one = pixels(pipe(PROMPTS, batch_size=1, **kwargs).images)
    four = pixels(pipe(PROMPTS, batch_size=4, **kwargs).images)  # batches of 4 and 2
    # Exactly equal on the development machine; batched matrix products may round differently
    # elsewhere, which can move a pixel across a rounding boundary by at most one level.
    assert np.abs(one - four).max() <= 1
    assert (one != four).mean() < 0.01
    # in floats: the same up to float32 rounding
    alone = pipe.denoise([PROMPTS[1]], [2], steps=3, sampler=sampler)
    batched = pipe.denoise([PROMPTS[0], PROMPTS[0], PROMPTS[1], PROMPTS[1]], [0, 1, 2, 3], steps=3, sampler=sampler)
    torch.testing.assert_close(alone[0], batched[2], rtol=0, atol=1e-5)


class RowsPerStep(AttentionController):
    """The numbers of rows the cross-attention calls of each step see, and their conditional slice."""

    def __init__(self):
        self.rows = {}

    def wants(self, site):
        return True

    def process(self, site, probabilities):
        rows = range(probabilities.shape[0])[site.conditional]
        self.rows.setdefault(site.step, set()).add((probabilities.shape[0], rows.start, rows.stop))


def test_guidance_one_skips_the_unconditional_half(pipe):
    off, on = RowsPerStep(), RowsPerStep()
    x1 = pipe.denoise(PROMPTS, [0, 1], steps=2, guidance=1.0, attention_controller=off)
    x3 = pipe.denoise(PROMPTS, [0, 1], steps=2, guidance=3.0, attention_controller=on)
    assert off.rows == {0: {(2, 0, 2)}, 1: {(2, 0, 2)}} and on.rows == {0: {(4, 2, 4)}, 1: {(4, 2, 4)}}
    assert torch.isfinite(x1).all()
    assert (x1 - x3).abs().max() > 1e-5
    out = pipe(PROMPTS[0], guidance=1.0, steps=2, progress=False)
    assert len(out.images) == 1


def test_guidance_acts_in_the_steps_before_the_cutoff_only(pipe):
    """Steps i with i / steps < cutoff run both halves (unconditional first); later ones the
    conditional rows alone, which the controllers are told are all the rows."""
    seen = {}
    for cutoff in (0.0, 0.5, 0.7, 1.0):
        controller = RowsPerStep()
        pipe.denoise(PROMPTS, [0, 1], steps=4, guidance=3.0, guidance_cutoff=cutoff, attention_controller=controller)
        seen[cutoff] = controller.rows
    guided, alone = {(4, 2, 4)}, {(2, 0, 2)}
    assert seen[0.0] == {0: alone, 1: alone, 2: alone, 3: alone}
    assert seen[0.5] == {0: guided, 1: guided, 2: alone, 3: alone}
    assert seen[0.7] == {0: guided, 1: guided, 2: guided, 3: alone}  # 3 / 4 = 0.75 is past 0.7
    assert seen[1.0] == {0: guided, 1: guided, 2: guided, 3: guided}


def test_a_guidance_cutoff_changes_only_the_steps_after_it(exact_pipe):
    """Up to the cutoff the images are those of guidance at every step; with cutoff 0 they are
    guidance 1's images, bit for bit; the cutoff is recorded in the settings."""
    latents = {}

    def keep(cutoff):
        def callback(pipeline, step, timestep, tensors):
            latents[cutoff, step] = tensors["latents"].clone()
            return tensors

        return callback

    finals = {}
    for cutoff in (0.5, 1.0):
        finals[cutoff] = exact_pipe.denoise(
            PROMPTS, [0, 1], steps=4, guidance=3.0, guidance_cutoff=cutoff, callback_on_step_end=keep(cutoff)
        )
    assert torch.equal(latents[0.5, 1], latents[1.0, 1])  # steps 0 and 1 guided in both
    assert (latents[0.5, 2] - latents[1.0, 2]).abs().max() > 1e-4
    assert (finals[0.5] - finals[1.0]).abs().max() > 1e-4
    never = exact_pipe.denoise(PROMPTS, [0, 1], steps=4, guidance=3.0, guidance_cutoff=0.0)
    assert torch.equal(never, exact_pipe.denoise(PROMPTS, [0, 1], steps=4, guidance=1.0))
    assert exact_pipe(PROMPTS[0], steps=2, guidance_cutoff=0.5, progress=False).settings["guidance_cutoff"] == 0.5
    assert exact_pipe(PROMPTS[0], steps=2, progress=False).settings["guidance_cutoff"] == DEFAULT_GUIDANCE_CUTOFF


def test_a_swap_past_the_guidance_cutoff_pairs_its_rows(exact_pipe):
    """Past the cutoff the swap's rows are (source, edit) pairs without the unconditional half: the
    source is still the image its prompt gives alone, and an edit given the source's maps at every
    step (edit steps 1) has the source's maps after the cutoff too."""
    settings = SWAP_SETTINGS.but(steps=4, guidance_cutoff=0.5)
    kept, free_plan = exact_pipe.swap_plan(SWAPS[:1], keep_layout=True), exact_pipe.swap_plan(SWAPS[:1], False)
    x, maps = exact_pipe.swap_batch(kept, [3], settings.but(edit_steps=1.0), maps=MapOptions())
    alone = exact_pipe.denoise([SWAPS[0][0]], [3], steps=4, guidance=3.0, guidance_cutoff=0.5)
    torch.testing.assert_close(x[0], alone[0], rtol=0, atol=1e-3)  # rows of another batch: rounding only
    _, free = exact_pipe.swap_batch(free_plan, [3], settings.but(edit_steps=0.5), maps=MapOptions())
    for word in ("circle", "left"):
        torch.testing.assert_close(maps[1][word], maps[0][word], rtol=0, atol=1e-5)
        assert (free[1][word] - free[0][word]).abs().max() > 1e-4  # maps left free after the cutoff differ


def test_negative_prompt_changes_the_output(pipe):
    plain = pipe.denoise([PROMPTS[0]], [0], steps=3)
    negative = pipe.denoise([PROMPTS[0]], [0], steps=3, negative_prompt="a blue square")
    empty = pipe.denoise([PROMPTS[0]], [0], steps=3, negative_prompt="")
    assert (plain - negative).abs().max() > 1e-4
    assert torch.equal(plain, empty)  # "" is the default negative prompt
    out = pipe(PROMPTS[0], steps=3, negative_prompt="a blue square", progress=False)
    assert out.settings["negative_prompt"] == "a blue square"


def test_one_negative_prompt_per_prompt(pipe):
    """A list gives each prompt its own negative prompt: the same images as sampling each prompt
    alone with its negative."""
    both = pipe.denoise(PROMPTS, [0, 1], steps=3, negative_prompt=["a blue square", ""])
    first = pipe.denoise(PROMPTS[:1], [0], steps=3, negative_prompt="a blue square")
    second = pipe.denoise(PROMPTS[1:], [1], steps=3)
    assert torch.allclose(both, torch.cat([first, second]), atol=1e-5)
    with pytest.raises(UserError, match="1 negative prompts for 2 prompts"):
        pipe.denoise(PROMPTS, [0, 1], steps=1, negative_prompt=["a blue square"])


def test_the_controller_sees_every_sampling_step(pipe):
    class Steps(AttentionController):
        def __init__(self):
            self.steps = []

        def wants(self, site):
            return site.name == "mid.attn.0"

        def process(self, site, probabilities):
            self.steps.append(site.step)

    controller = Steps()
    pipe(PROMPTS[0], steps=4, attention_controller=controller, progress=False)
    assert controller.steps == [0, 1, 2, 3]


def test_callback_on_step_end_is_called_once_per_step_and_can_replace_the_images(pipe):
    calls = []

    def watch(pipeline, step, timestep, tensors):
        calls.append((pipeline, step, int(timestep), tuple(tensors["latents"].shape)))
        return {}  # no "latents": the images go on unchanged

    plain = pipe.denoise(PROMPTS, [0, 1], steps=3)
    watched = pipe.denoise(PROMPTS, [0, 1], steps=3, callback_on_step_end=watch)
    assert torch.equal(watched, plain)
    assert calls == [(pipe, k, t, (2, 3, 16, 16)) for k, t in enumerate(sampler_timesteps(3, 1000))]

    def zero_at(at):
        def callback(pipeline, step, timestep, tensors):
            return {"latents": torch.zeros_like(tensors["latents"])} if step == at else tensors

        return callback

    grey = pipe.denoise(PROMPTS, [0, 1], steps=3, callback_on_step_end=zero_at(2))
    assert torch.equal(grey, torch.zeros_like(grey))
    assert {tuple(p) for image in to_pil(grey) for p in np.asarray(image).reshape(-1, 3)} == {(128, 128, 128)}
    early = pipe.denoise(PROMPTS, [0, 1], steps=3, callback_on_step_end=zero_at(0))
    assert (early - plain).abs().max() > 1e-3 and early.abs().max() > 1e-3  # denoising went on from zeros
    # the batch sampler hands the callback through
    parsed = [parse_prompt(p) for p in PROMPTS]
    settings = SamplingSettings(steps=3, guidance=3.0, sampler="euler")
    x, _ = pipe.sample_batch(parsed, [0, 1], settings, callback_on_step_end=zero_at(2))
    assert torch.equal(x, grey)


@pytest.fixture(scope="module")
def exact_pipe(tiny_model):
    """float32: images of different batches agree to float rounding (bf16 would round more)."""
    return Pipeline.from_pretrained(tiny_model, device="cpu", mixed_precision="no")


SWAP_SETTINGS = SamplingSettings(steps=3, guidance=3.0, sampler="euler", edit_steps=0.6)
SWAPS = [("a red circle on the left", "a blue circle on the left"), ("a green square", "a green triangle")]


def test_a_batch_of_swaps_gives_the_images_of_one_swap_each(exact_pipe):
    x, maps = exact_pipe.swap_batch(exact_pipe.swap_plan(SWAPS), [3, 7], SWAP_SETTINGS)
    assert x.shape == (4, 3, 16, 16) and maps is None
    for k, ((source, edit), seed) in enumerate(zip(SWAPS, [3, 7])):
        alone, _ = exact_pipe.swap_batch(exact_pipe.swap_plan([(source, edit)]), [seed], SWAP_SETTINGS)
        torch.testing.assert_close(x[2 * k : 2 * k + 2], alone, rtol=0, atol=1e-5)
        outputs = exact_pipe.swap(source, edit, seed=seed, steps=3, edit_steps=0.6, progress=False)
        for output, row, prompt in zip(outputs, (2 * k, 2 * k + 1), (source, edit)):
            assert output.prompts == [prompt] and output.seeds == [seed]
            assert np.abs(pixels(output.images)[0] - uint8_images(x[row : row + 1])[0].astype(int)).max() <= 1
    assert (x[0] - x[2]).abs().max() > 1e-3  # the pairs differ: the test can tell them apart


def test_swap_images_do_not_depend_on_its_batch_size(exact_pipe):
    kwargs = {"seed": 5, "steps": 3, "progress": False}
    by_one = exact_pipe.swap(*SWAPS[0], num_images=3, batch_size=1, **kwargs)
    together = exact_pipe.swap(*SWAPS[0], num_images=3, batch_size=2, **kwargs)  # pairs 2 and 1
    for a, b in zip(by_one, together):
        assert a.seeds == b.seeds == [5, 6, 7] and len(a.images) == 3
        assert np.abs(pixels(a.images) - pixels(b.images)).max() <= 1
        assert a.settings["local_blend"] is False
    assert not np.array_equal(pixels(by_one[0].images)[0], pixels(by_one[0].images)[1])  # seeds 5 and 6


def test_local_blend_with_an_unchanged_prompt_keeps_the_source(exact_pipe):
    plan = exact_pipe.swap_plan([(SWAPS[0][0], SWAPS[0][0])])
    x, _ = exact_pipe.swap_batch(plan, [4], SWAP_SETTINGS.but(local_blend=True))
    assert torch.equal(x[1], x[0])
    source, edit = exact_pipe.swap(
        SWAPS[0][0], SWAPS[0][0], num_images=2, seed=4, steps=3, local_blend=True, batch_size=2, progress=False
    )
    assert np.array_equal(pixels(edit.images), pixels(source.images))
    assert np.abs(pixels(source.images)[0] - uint8_images(x[:1])[0]).max() <= 1  # seed 4 in both
    assert source.settings["local_blend"] is True and edit.settings["local_blend"] is True


def test_swap_plan_keeps_the_unchanged_words_of_recolourings_or_as_asked(exact_pipe):
    plan = exact_pipe.swap_plan(SWAPS)
    mapping, changed, keep, layouts = plan.mapping, plan.changed, plan.keep, plan.layouts
    assert mapping.shape == keep.shape == (2, changed.shape[1]) and changed.shape[0] == 4
    assert torch.equal(keep[0], ~changed[1]) and changed[1].any()  # the colour swap keeps the others
    assert not keep[1].any()  # the shape swap keeps none
    assert layouts == ["on", "off"]
    on = exact_pipe.swap_plan(SWAPS, keep_layout=True)
    assert torch.equal(on.keep, ~changed[1::2]) and on.layouts == ["on", "on"] and torch.equal(on.mapping, mapping)
    off = exact_pipe.swap_plan(SWAPS, keep_layout=False)
    assert not off.keep.any() and off.layouts == ["off", "off"] and torch.equal(off.mapping, mapping)


def test_swap_plan_redraws_a_resized_object_and_keeps_the_rest(exact_pipe):
    pair = [("a small red circle on the left", "a large red circle on the left")]
    plan = exact_pipe.swap_plan(pair)
    parsed, mapping, keep, layouts = plan.prompts, plan.mapping, plan.keep, plan.layouts
    plain = exact_pipe.swap_plan(pair, keep_layout=False).mapping
    offsets = exact_pipe.encoder.offsets([parsed[1].text])[0]
    text = parsed[1].text
    redrawn = [text[a:b] for a, b in offsets.tolist() if b > a and text.index("large") <= a < text.index(" on")]
    assert layouts == ["redraw object"] and "".join(redrawn) == "largeredcircle"
    spans = [(a, b) for a, b in offsets.tolist()]
    for j, (a, b) in enumerate(spans):
        in_object = b > a and text.index("large") <= a < text.index(" on")
        assert (mapping[0, j] == -1) == (in_object or plain[0, j] == -1), j  # the object takes no source map
        assert bool(keep[0, j]) == (not in_object), j  # every other token keeps the source's map


@pytest.mark.parametrize("edit_steps", [-0.1, 1.5, float("nan")])
def test_swap_edit_steps_outside_zero_to_one_are_user_errors(exact_pipe, edit_steps):
    with pytest.raises(UserError, match="edit steps must be a fraction"):
        exact_pipe.swap(*SWAPS[0], SWAP_SETTINGS, edit_steps=edit_steps, progress=False)


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(steps=0), "steps"),
        (dict(guidance=float("nan")), "guidance"),
        (dict(guidance=float("inf")), "guidance"),
        (dict(guidance=-1.0), "guidance"),
        (dict(guidance_cutoff=1.5), "guidance cutoff must be a fraction of the steps in [0, 1], got 1.5"),
        (dict(guidance_cutoff=-0.1), "guidance cutoff"),
        (dict(guidance_cutoff=float("nan")), "guidance cutoff"),
        (dict(num_images_per_prompt=0), "images per prompt"),
        (dict(batch_size=0), "batch size"),
        (dict(sampler="plms"), "unknown sampler 'plms'"),
    ],
)
def test_bad_sampling_arguments_are_user_errors(pipe, kwargs, fragment):
    with pytest.raises(UserError, match=re.escape(fragment)):
        pipe(PROMPTS[0], progress=False, **{"steps": 2, **kwargs})


def test_no_prompt_is_a_user_error(pipe):
    with pytest.raises(UserError, match="no prompt"):
        pipe([], steps=2, progress=False)


def test_a_too_long_prompt_warns_with_the_cut_text_and_still_samples(pipe):
    prompt = "a red circle on the left " * 8 + "and a purple zebra"
    with pytest.warns(UserWarning, match="prompt truncated") as record:
        out = pipe(prompt, steps=2, progress=False)
    messages = [str(w.message) for w in record if "truncated" in str(w.message)]
    assert len(messages) == 1
    cut = re.search(r'cut: "(.*)"', messages[0]).group(1)
    assert cut.endswith("a purple zebra") and prompt.endswith(cut) and len(cut) < len(prompt)
    assert len(out.images) == 1 and out.images[0].size == (16, 16)


def test_save_pretrained_round_trip_replaces_an_existing_folder(pipe, tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "stale.txt").write_text("old")
    pipe.save_pretrained(target, {"note.txt": "hello"})
    assert not (target / "stale.txt").exists()
    assert (target / "note.txt").read_text() == "hello"
    assert not list(tmp_path.glob(".model.*"))  # no temporary folders left behind
    again = Pipeline.from_pretrained(target, device="cpu")
    for (name, a), (_, b) in zip(pipe.unet.state_dict().items(), again.unet.state_dict().items()):
        assert torch.equal(a, b), name


# ---- loading errors ---------------------------------------------------------------------------
@pytest.fixture
def model_copy(tiny_model, tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(tiny_model, copy)
    return copy


def test_missing_folder(tmp_path):
    with pytest.raises(UserError, match="model folder .*nothere' not found"):
        Pipeline.from_pretrained(tmp_path / "nothere")


def test_folder_without_model_index(tmp_path):
    with pytest.raises(UserError, match="model_index.json is missing"):
        Pipeline.from_pretrained(tmp_path)


def test_corrupt_model_index(model_copy):
    (model_copy / "model_index.json").write_text("{not json")
    with pytest.raises(UserError, match="corrupt"):
        Pipeline.from_pretrained(model_copy)


@pytest.mark.parametrize("version", [2, 0, None])
def test_model_index_from_another_format_version(model_copy, version):
    index = json.loads((model_copy / "model_index.json").read_text())
    index["format_version"] = version
    (model_copy / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(UserError, match="incompatible version"):
        Pipeline.from_pretrained(model_copy)


@pytest.mark.parametrize("part", ["unet", "text_encoder", "tokenizer", "scheduler"])
def test_missing_subfolder(model_copy, part):
    shutil.rmtree(model_copy / part)
    with pytest.raises(UserError, match=f"missing '{part}/'"):
        Pipeline.from_pretrained(model_copy)


def test_missing_unet_weights(model_copy):
    for weights in (model_copy / "unet").glob("*.safetensors"):
        weights.unlink()
    with pytest.raises(UserError, match="cannot load .*unet"):
        Pipeline.from_pretrained(model_copy)


def test_missing_text_encoder_weights(model_copy):
    for weights in (model_copy / "text_encoder").glob("*.safetensors"):
        weights.unlink()
    with pytest.raises(UserError):
        Pipeline.from_pretrained(model_copy)


def test_bf16_autocast_changes_images_only_by_rounding(tiny_model):
    exact = Pipeline.from_pretrained(tiny_model, device="cpu", mixed_precision="no")
    bf16 = Pipeline.from_pretrained(tiny_model, device="cpu", mixed_precision="bf16")
    assert (exact.mixed_precision, bf16.mixed_precision) == ("no", "bf16")
    a = exact.denoise(PROMPTS, [0, 1], steps=5)
    b = bf16.denoise(PROMPTS, [0, 1], steps=5)
    assert not torch.equal(a, b)  # the UNet really ran in bf16
    assert (a - b).abs().mean() < 0.02  # about 2 grey levels of 255


def test_unknown_mixed_precision_is_a_user_error(tiny_model):
    with pytest.raises(UserError, match="auto, no, fp16, bf16"):
        Pipeline.from_pretrained(tiny_model, device="cpu", mixed_precision="fp8")


# ---- the diffusers way ---------------------------------------------------------------------


def test_diffusers_loads_an_exported_model(pipe, tmp_path):
    from diffusers import DiffusionPipeline

    pipe.save_pretrained(tmp_path / "model")
    assert (tmp_path / "model" / "pipeline.py").is_file()
    loaded = DiffusionPipeline.from_pretrained(tmp_path / "model", trust_remote_code=True).to("cpu")
    assert isinstance(loaded, Pipeline)
    ours = Pipeline.from_pretrained(tmp_path / "model", device="cpu")
    assert np.array_equal(
        pixels(loaded("a red circle", steps=3, progress=False).images),
        pixels(ours("a red circle", steps=3, progress=False).images),
    )


def test_a_model_exported_before_the_package_had_folders_loads_both_ways(tmp_path):
    """tests/assets/small-shapes was exported when Pipeline lived in diffusion/pipeline.py, which
    its pipeline.py imports: it loads here and through diffusers, with the same images."""
    from diffusers import DiffusionPipeline

    old = Path(__file__).parent / "assets" / "small-shapes"
    assert "from diffusion.pipeline import Pipeline" in (old / "pipeline.py").read_text()
    shutil.copytree(old, tmp_path / "model")  # diffusers may write into a remote-code folder
    ours = Pipeline.from_pretrained(tmp_path / "model", device="cpu")
    loaded = DiffusionPipeline.from_pretrained(tmp_path / "model", trust_remote_code=True).to("cpu")
    assert isinstance(loaded, Pipeline)
    assert np.array_equal(
        pixels(loaded("a red circle", steps=3, progress=False).images),
        pixels(ours("a red circle", steps=3, progress=False).images),
    )


def test_to_moves_the_pipeline_and_returns_it(pipe):
    assert pipe.to("cpu") is pipe and pipe.device.type == "cpu" and pipe.encoder.model.device.type == "cpu"


def test_generators_instead_of_seeds(pipe):
    by_seed = pipe("a red circle", num_images_per_prompt=3, seed=7, steps=3, progress=False)
    generators = [torch.Generator().manual_seed(7 + i) for i in range(3)]
    by_generator = pipe(
        "a red circle", num_images_per_prompt=3, generator=generators, steps=3, batch_size=2, progress=False
    )
    assert np.array_equal(pixels(by_seed.images), pixels(by_generator.images))
    assert by_seed.seeds == [7, 8, 9] and by_generator.seeds == [None] * 3
    one = pipe(
        "a red circle", num_images_per_prompt=2, generator=torch.Generator().manual_seed(7), steps=3, progress=False
    )
    assert len(one.images) == 2 and not np.array_equal(*pixels(one.images))  # drawn one after the other
    with pytest.raises(UserError, match="2 generators for 3 images"):
        pipe("a red circle", num_images_per_prompt=3, generator=generators[:2], progress=False)


def test_output_types(pipe):
    pil = pipe(["a red circle", "a blue square"], steps=3, progress=False).images
    pt = pipe(["a red circle", "a blue square"], steps=3, output_type="pt", progress=False).images
    np_images = pipe(["a red circle", "a blue square"], steps=3, output_type="np", progress=False).images
    assert pt.shape == (2, 3, 16, 16) and np_images.shape == (2, 16, 16, 3)
    assert 0 <= float(pt.min()) and float(pt.max()) <= 1
    assert np.abs(np_images * 255 - pixels(pil)).max() <= 0.5  # the PIL images are these, rounded
    assert np.allclose(pt.permute(0, 2, 3, 1).numpy(), np_images)
    with pytest.raises(UserError, match="unknown output_type 'latent'"):
        pipe("a red circle", output_type="latent", progress=False)


def test_callback_on_step_end_through_the_call(pipe):
    steps_seen = []

    def callback(pipeline, step, timestep, tensors):
        steps_seen.append(step)
        return {"latents": torch.zeros_like(tensors["latents"])} if step == 3 else tensors

    image = pipe("a red circle", steps=4, callback_on_step_end=callback, progress=False).images[0]
    assert steps_seen == [0, 1, 2, 3]
    assert np.unique(np.asarray(image)).tolist() == [128]  # zeros in [-1, 1] are mid-grey


def test_sampling_keywords_and_settings_together_are_a_user_error(pipe):
    with pytest.raises(UserError, match="pass the sampling settings as keywords .* or as settings=, not both"):
        pipe(PROMPTS[0], steps=3, settings=SamplingSettings(steps=2), progress=False)
    same = pipe(PROMPTS[0], settings=SamplingSettings(steps=2), output_type="pt", progress=False).images
    assert torch.equal(same, pipe(PROMPTS[0], steps=2, output_type="pt", progress=False).images)
