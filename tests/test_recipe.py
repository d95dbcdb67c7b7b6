"""The training recipe's options: at their off values the default trains and samples exactly as
before them; self-conditioning trains, samples reproducibly and resumes exactly; the prior's
measures read clean and blended images as a person would."""

import copy
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY  # tests/ is on sys.path (pytest's rootdir conftest)
from safetensors.torch import load_file

from diffusion import Pipeline
from diffusion.config import config_from_dict
from diffusion.data.shapes import BACKGROUND, COLOURS, POSITIONS, SIZES, Scene, ShapeObject, render_scene
from diffusion.evaluation.detector import detect
from diffusion.evaluation.edits import is_clean_scene, palette_prompts, prior_targets
from diffusion.model.unet import UNet, estimate_clean
from diffusion.training.loop import train

REPO = Path(__file__).resolve().parents[1]
REFERENCE = json.loads((REPO / "tests" / "assets" / "reference-digests.json").read_text())


def digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def reference_config(**model) -> dict:
    cfg = copy.deepcopy(TINY)
    cfg["model"].update(model)
    cfg["train"].update(max_steps=6, mixed_precision="no", checkpoint_every=6, validate_every=6)
    return cfg


def sample_reference_images(model_dir) -> np.ndarray:
    pipe = Pipeline.from_pretrained(model_dir, mixed_precision="no")
    out = pipe(
        ["a red circle on the left", "a (blue:0) square"],
        steps=4,
        guidance=3.0,
        seed=0,
        output_type="np",
        progress=False,
    )
    return np.asarray(out.images, dtype=np.float32)


@pytest.fixture(scope="module")
def self_conditioned_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("selfcond") / "run"
    cfg = copy.deepcopy(TINY)
    cfg["model"]["self_conditioning"] = True
    train(config_from_dict(cfg), out)
    return out


@pytest.fixture
def float32_training():
    """accelerate keeps one mixed precision per process: the other tests' runs use the default's."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


def test_the_options_off_reproduce_the_weights_and_images_from_before_them(tmp_path, float32_training):
    """The default recipe (self_conditioning false) gives the weights and images that the code
    before self-conditioning gave, bit for bit (float32, one thread)."""
    model = train(config_from_dict(reference_config(self_conditioning=False)), tmp_path / "run")
    unet = load_file(next((model / "unet").glob("*.safetensors")))
    assert digest(unet) == REFERENCE["unet"]
    images = sample_reference_images(model)
    assert hashlib.sha256(images.tobytes()).hexdigest() == REFERENCE["images"]


def test_a_self_conditioned_unet_reads_its_estimate_and_zeros_mean_none():
    torch.manual_seed(0)
    unet = UNet(
        sample_size=16,
        channels=(16, 32),
        attention_resolutions=(8,),
        attention_heads=2,
        context_dim=8,
        self_conditioning=True,
    )
    torch.nn.init.normal_(unet.conv_out.weight, std=0.1)  # zero-initialised: the output would not show the input
    x, estimate = torch.randn(2, 3, 16, 16), torch.randn(2, 3, 16, 16)
    context = torch.randn(2, 5, 8)
    assert unet.conv_in.in_channels == 6
    plain = unet(x, 500, context)
    assert torch.equal(plain, unet(torch.cat([x, torch.zeros_like(x)], 1), 500, context))
    assert not torch.allclose(plain, unet(torch.cat([x, estimate], 1), 500, context))


@pytest.mark.parametrize("prediction_type", ["v_prediction", "epsilon"])
def test_estimate_clean_inverts_the_noising(prediction_type):
    torch.manual_seed(0)
    x0, noise = torch.rand(4, 3, 8, 8) * 2 - 1, torch.randn(4, 3, 8, 8)
    a = torch.tensor([0.99, 0.7, 0.3, 0.05])
    s, n = a.sqrt().reshape(-1, 1, 1, 1), (1 - a).sqrt().reshape(-1, 1, 1, 1)
    noisy = s * x0 + n * noise
    prediction = s * noise - n * x0 if prediction_type == "v_prediction" else noise
    assert torch.allclose(estimate_clean(prediction, noisy, a, prediction_type), x0, atol=1e-5)


def test_self_conditioning_trains_and_samples_the_same_images_for_a_seed(self_conditioned_run):
    model = self_conditioned_run / "model"
    assert json.loads((model / "unet" / "config.json").read_text())["self_conditioning"] is True
    first, again = sample_reference_images(model), sample_reference_images(model)
    assert np.array_equal(first, again)
    assert np.isfinite(first).all() and first.std() > 0


def test_self_conditioning_resumes_exactly(self_conditioned_run, tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copytree(self_conditioned_run / "clip", run / "clip")
    shutil.copytree(self_conditioned_run / "checkpoints" / "step-000002", run / "checkpoints" / "step-000002")
    cfg = copy.deepcopy(TINY)
    cfg["model"]["self_conditioning"] = True
    train(config_from_dict(cfg), run, resume="latest")
    for name in ("model", "ema"):
        a = load_file(run / "checkpoints" / "step-000004" / f"{name}.safetensors")
        b = load_file(self_conditioned_run / "checkpoints" / "step-000004" / f"{name}.safetensors")
        assert digest(a) == digest(b)


def _render(*objects: tuple[str, str, str, str]) -> tuple[np.ndarray, np.ndarray]:
    """The generator's own image and masks of objects (colour, shape, size, position) at their anchors."""
    placed = [
        ShapeObject(c, shape, size, p, (POSITIONS[p][0] * 32, POSITIONS[p][1] * 32), SIZES[size] * 32)
        for c, shape, size, p in objects
    ]
    return render_scene(Scene(placed, "", [], [], []), 32)


def test_a_clean_scene_is_every_object_one_colour_and_a_blend_or_empty_image_is_not():
    square, _ = _render(("red", "square", "large", "centre"))
    two, _ = _render(("blue", "circle", "small", "left"), ("green", "cross", "large", "right"))
    blend, masks = _render(("yellow", "square", "large", "centre"))
    right_half = masks[0].copy()
    right_half[:, :16] = False
    blend[right_half] = COLOURS["purple"]  # one object, two colours: the model's blends
    empty = np.full_like(square, BACKGROUND)
    assert is_clean_scene(square, detect(square))
    assert is_clean_scene(two, detect(two))
    assert not is_clean_scene(blend, detect(blend))
    assert not is_clean_scene(empty, detect(empty))


def test_the_palette_prompts_name_no_colour_and_differ():
    prompts = palette_prompts()
    assert len(set(prompts)) == len(prompts)
    assert not any(colour in p.split() for p in prompts for colour in COLOURS)


def test_prior_targets_read_shares_as_at_least_and_the_palette_as_at_most():
    good = prior_targets({"colour deleted drawn": 0.9, "palette top share": 0.4, "unconditional clean": 0.95})
    bad = prior_targets({"colour deleted drawn": 0.5, "palette top share": 0.5, "unconditional clean": 0.89})
    assert all(t["met"] for t in good.values())
    assert not any(t["met"] for t in bad.values())


def test_the_prior_part_reports_its_three_measures_and_targets(tiny_model):
    from diffusion.evaluation.edits import PRIOR_PROMPTS, PRIOR_SEEDS
    from diffusion.evaluation.report import evaluate, format_report

    pipe = Pipeline.from_pretrained(tiny_model, device="cpu")
    report, _, _ = evaluate(pipe, n_edit=3, batch_size=16, detector_n=1, parts=("prior",), holdout=[])
    prior = report["prior"]
    assert prior["n"] == 3 and len(prior["palette"]) == PRIOR_PROMPTS
    for entry in prior["palette"]:
        assert sum(entry["colours"].values()) <= PRIOR_SEEDS
        assert entry["top share"] == max(entry["colours"].values()) / PRIOR_SEEDS
    assert 0 <= prior["colour deleted drawn"] <= 1 and 0 <= prior["unconditional clean"] <= 1
    assert set(prior_targets(prior)) <= set(report["targets"])
    assert "colour-deleted prompts draw one clean object" in format_report(report)
