"""Tests for diffusion/training/loop.py, diffusion/data/batches.py and diffusion/checkpoint.py: what a run writes,
resuming, failures."""

import copy
import hashlib
import json
import os
import shutil

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from diffusion import checkpoint as ckpt
from diffusion.config import Config, config_from_dict
from diffusion.data.datasets import build_dataset
from diffusion.errors import UserError
from diffusion.sampling.model_folder import FORMAT_VERSION
from diffusion.sampling.settings import SamplingSettings
from diffusion.training.loop import sample_timesteps, timestep_weights, train

CHECKPOINT_FILES = {"model.safetensors", "ema.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json"}


def weights(run, step, name="model"):
    return load_file(run / "checkpoints" / f"step-{step:06d}" / f"{name}.safetensors")


def assert_same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def tree_digest(folder):
    """{relative path: sha256} of every file under `folder`."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


# ---- what a run writes --------------------------------------------------------------------------
def test_run_keeps_the_newest_checkpoints(tiny_run):
    names = [p.name for p in ckpt.list_checkpoints(tiny_run / "checkpoints")]
    assert names == ["step-000002", "step-000004"]
    assert sorted(p.name for p in (tiny_run / "checkpoints").iterdir()) == names  # no leftovers


@pytest.mark.skipif(os.name != "posix", reason="permission bits are POSIX")
def test_weight_files_are_as_readable_as_the_config_files_beside_them(tiny_run):
    # safetensors 0.8 creates its files 0o600 (its issue #782); a saved model, CLIP or checkpoint
    # must be readable by whoever may read its config
    expected = (tiny_run / "config.yaml").stat().st_mode & 0o777
    modes = {str(f.relative_to(tiny_run)): f.stat().st_mode & 0o777 for f in tiny_run.rglob("*.safetensors")}
    assert any(name.startswith("model/unet") for name in modes) and any(name.startswith("clip/") for name in modes)
    assert any(name.startswith("checkpoints/") for name in modes)
    assert modes == dict.fromkeys(modes, expected)


def test_checkpoints_are_safetensors_and_json(tiny_run):
    for step in (2, 4):
        folder = tiny_run / "checkpoints" / f"step-{step:06d}"
        assert {p.name for p in folder.iterdir()} == CHECKPOINT_FILES
        state = json.loads((folder / "state.json").read_text())
        assert state["step"] == step
        assert state["config"]["train"]["max_steps"] == 4
        assert state["lr_scheduler"]["last_epoch"] == step
        model, ema, optimizer = (weights(tiny_run, step, n) for n in ("model", "ema", "optimizer"))
        assert model and model.keys() >= ema.keys() and optimizer
        assert "torch" in load_file(folder / "rng.safetensors")


def test_no_pickle_files_anywhere_in_the_run(tiny_run):
    pickled = [p for p in tiny_run.rglob("*") if p.suffix in {".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt"}]
    assert pickled == []


def test_training_changes_the_weights(tiny_run):
    a, b = weights(tiny_run, 2), weights(tiny_run, 4)
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_validation_grids_are_written(tiny_run):
    grids = sorted((tiny_run / "samples").glob("*.png"))
    assert [p.name for p in grids] == ["step-000004.png"]  # validate_every=4
    with Image.open(grids[0]) as grid:
        assert grid.width > 16 * 2 and grid.height > 16  # two labelled images, scaled up
        assert grid.text["step"] == "4"
        assert grid.text["sampler"] == "euler"  # the default sampler


def test_the_exported_model_folder(tiny_run):
    model = tiny_run / "model"
    for part in ("unet", "text_encoder", "tokenizer", "scheduler"):
        assert (model / part).is_dir(), part
    index = json.loads((model / "model_index.json").read_text())
    assert index["format_version"] == FORMAT_VERSION
    config = yaml.safe_load((tiny_run / "config.yaml").read_text())
    assert index["text_encoder_options"]["max_length"] == config["text"]["max_length"] == 40
    assert (model / "unet" / "config.json").is_file()
    assert (model / "config.yaml").is_file() and (tiny_run / "config.yaml").is_file()
    assert not list(tiny_run.glob(".model*"))  # no temporary export folders left behind
    # the export holds the EMA weights of the last step
    exported = load_file(next((model / "unet").glob("*.safetensors")))
    ema = weights(tiny_run, 4, "ema")
    for name, tensor in ema.items():
        assert torch.equal(exported[name], tensor), name


# ---- resuming -----------------------------------------------------------------------------------
def test_resume_latest_continues_from_the_newest_checkpoint(run_copy, tiny_dict, capsys):
    tiny_dict["train"]["max_steps"] = 6
    train(config_from_dict(tiny_dict), run_copy, resume="latest")
    assert f"resumed from {run_copy / 'checkpoints' / 'step-000004'} at step 4" in capsys.readouterr().out
    names = [p.name for p in ckpt.list_checkpoints(run_copy / "checkpoints")]
    assert names == ["step-000004", "step-000006"]  # keep_checkpoints=2 pruned step 2
    assert json.loads((run_copy / "checkpoints" / "step-000006" / "state.json").read_text())["step"] == 6
    before, after = weights(run_copy, 4), weights(run_copy, 6)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert (run_copy / "samples" / "step-000006.png").is_file()


def test_resuming_reproduces_the_uninterrupted_run_exactly(tiny_run, run_copy, tiny_dict):
    """RNG, optimizer, LR schedule and EMA are restored: steps 3-4 after a resume from step 2
    give bit-identical weights to the original run."""
    original = {name: weights(tiny_run, 4, name) for name in ("model", "ema", "optimizer")}
    train(config_from_dict(tiny_dict), run_copy, resume=str(run_copy / "checkpoints" / "step-000002"))
    for name, tensors in original.items():
        assert_same(weights(run_copy, 4, name), tensors)
    assert_same(
        load_file(next((run_copy / "model" / "unet").glob("*.safetensors"))),
        load_file(next((tiny_run / "model" / "unet").glob("*.safetensors"))),
    )


def test_resume_latest_without_checkpoints_starts_fresh(tiny_run, tmp_path, tiny_dict, capsys):
    out = tmp_path / "fresh"
    train(config_from_dict(tiny_dict), out, resume="latest")
    assert "resumed" not in capsys.readouterr().out
    assert [p.name for p in ckpt.list_checkpoints(out / "checkpoints")] == ["step-000002", "step-000004"]
    # training is a pure function of the config: the same weights as the session's run
    assert_same(weights(out, 4), weights(tiny_run, 4))


@pytest.mark.parametrize(
    "name, corrupt",
    [
        ("model.safetensors", lambda data: data[: len(data) // 2]),
        ("model.safetensors", lambda data: b""),
        ("optimizer.safetensors", lambda data: data[:-8]),
        ("rng.safetensors", lambda data: b"not a safetensors file"),
        ("state.json", lambda data: b"\x00\xff garbage {"),
        ("state.json", lambda data: b"{}"),
        ("model.safetensors", lambda data: data[:-1000] + bytes([data[-1000] ^ 1]) + data[-999:]),
        ("ema.safetensors", lambda data: data[:-1] + bytes([data[-1] ^ 0x80])),
    ],
    ids=[
        "model-half",
        "model-empty",
        "optimizer-truncated",
        "rng-garbage",
        "state-garbage",
        "state-no-step",
        "model-one-bit",
        "ema-last-bit",
    ],
)
def test_a_corrupt_checkpoint_is_named_and_latest_resumes_from_the_one_before(
    run_copy, tiny_dict, name, corrupt, capsys
):
    checkpoints = run_copy / "checkpoints"
    latest = checkpoints / "step-000004"
    path = latest / name
    path.write_bytes(corrupt(path.read_bytes()))
    tiny_dict["train"]["max_steps"] = 6
    with pytest.raises(UserError, match=f"checkpoint '{latest}' is corrupt"):
        train(config_from_dict(tiny_dict), run_copy, resume=str(latest))
    assert not (checkpoints / "step-000006").exists()

    train(config_from_dict(tiny_dict), run_copy, resume="latest")
    out, err = capsys.readouterr()
    assert (
        f"warning: checkpoint '{latest}' is corrupt" in err and f"resuming from '{checkpoints / 'step-000002'}'" in err
    )
    assert len([line for line in err.splitlines() if "warning" in line]) == 1
    assert f"resumed from {checkpoints / 'step-000002'} at step 2" in out
    assert [p.name for p in ckpt.list_checkpoints(checkpoints)] == ["step-000004", "step-000006"]
    ckpt.load_checkpoint(checkpoints / "step-000004")  # the corrupt one was written anew at step 4


def test_latest_with_every_checkpoint_corrupt_is_a_user_error(run_copy, tiny_dict):
    for step in (2, 4):
        (run_copy / "checkpoints" / f"step-{step:06d}" / "model.safetensors").write_bytes(b"")
    with pytest.raises(UserError, match="no checkpoint in .* reads back whole .*step-000004.*another --output-dir"):
        train(config_from_dict(tiny_dict), run_copy, resume="latest")


def test_a_checkpoint_with_a_missing_file_is_a_user_error_naming_it(run_copy, tiny_dict):
    latest = run_copy / "checkpoints" / "step-000004"
    (latest / "ema.safetensors").unlink()
    with pytest.raises(UserError, match=f"checkpoint '{latest}' is incomplete: ema.safetensors is missing"):
        train(config_from_dict(tiny_dict), run_copy, resume=str(latest))
    assert ckpt.load_latest(run_copy / "checkpoints")["path"] == run_copy / "checkpoints" / "step-000002"


def test_resume_from_a_missing_checkpoint_folder(run_copy, tiny_dict):
    with pytest.raises(UserError, match="checkpoint .*step-000099' not found"):
        train(config_from_dict(tiny_dict), run_copy, resume=str(run_copy / "checkpoints" / "step-000099"))


def test_resume_with_another_model_config_is_a_user_error(run_copy, tiny_dict):
    tiny_dict["model"]["channels"] = [16, 16]
    tiny_dict["train"]["max_steps"] = 6
    saved_config = (run_copy / "config.yaml").read_text()
    with pytest.raises(UserError, match="step-000004' was saved with other model.. settings"):
        train(config_from_dict(tiny_dict), run_copy, resume="latest")
    assert (run_copy / "config.yaml").read_text() == saved_config  # nothing written before the error


def test_an_interrupted_save_is_ignored_and_the_last_good_checkpoint_kept(run_copy, tiny_dict, capsys):
    checkpoints = run_copy / "checkpoints"
    partial = checkpoints / "step-000008.tmp"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"half written")
    assert ckpt.resolve_resume("latest", checkpoints) == checkpoints / "step-000004"

    tiny_dict["train"]["max_steps"] = 6
    train(config_from_dict(tiny_dict), run_copy, resume="latest")
    assert f"resumed from {checkpoints / 'step-000004'} at step 4" in capsys.readouterr().out
    assert [p.name for p in ckpt.list_checkpoints(checkpoints)] == ["step-000004", "step-000006"]


def test_a_fresh_run_into_a_folder_with_checkpoints_is_refused(run_copy, tiny_dict):
    before = tree_digest(run_copy)
    with pytest.raises(UserError, match="already holds checkpoints; pass --resume latest"):
        train(config_from_dict(tiny_dict), run_copy)
    assert tree_digest(run_copy) == before


def test_an_output_folder_under_a_file_is_a_user_error(tmp_path, tiny_dict):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(UserError, match="cannot create output folder"):
        train(config_from_dict(tiny_dict), tmp_path / "afile" / "run")


def test_save_checkpoint_replaces_and_prune_keeps_the_newest(tiny_run, tmp_path):
    """list_checkpoints ignores .tmp folders and files; prune keeps the newest `keep`."""
    folder = tmp_path / "checkpoints"
    for step in (1, 5, 10, 20):
        shutil.copytree(tiny_run / "checkpoints" / "step-000002", folder / f"step-{step:06d}")
    (folder / "step-000030.tmp").mkdir()
    (folder / "step-000040").write_text("a file, not a checkpoint")
    assert [p.name for p in ckpt.list_checkpoints(folder)] == [
        "step-000001",
        "step-000005",
        "step-000010",
        "step-000020",
    ]
    ckpt.prune_checkpoints(folder, 2)
    assert [p.name for p in ckpt.list_checkpoints(folder)] == ["step-000010", "step-000020"]
    assert (folder / "step-000030.tmp").is_dir()


def test_the_small_clip_learns_from_every_object_count_equally():
    """With data.object_weights the UNet sees the weighted mix, but the CLIP trains on the same
    seed's uniform mix (see `clip_training_data` for why)."""
    from diffusion.config import load_config
    from diffusion.data.captions import clip_training_data
    from diffusion.data.datasets import build_dataset

    cfg = load_config(None, ["data.num_samples=400", "data.object_weights=[1,0,0,0]"])
    dataset = build_dataset(cfg.data)
    images, captions = dataset.render_all(progress=False)
    assert all(len(dataset.scene(i).objects) == 1 for i in range(len(dataset)))
    clip_images, clip_captions = clip_training_data(cfg, images, captions, main=False)
    whole = ["data.num_samples=400", "data.object_weights=null", "data.omit_colour=0"]  # every colour named
    uniform = build_dataset(load_config(None, whole).data)
    assert clip_captions == [uniform.scene(i).caption for i in range(len(uniform))]
    assert clip_images.shape == images.shape and not torch.equal(clip_images, images)
    plain = load_config(None, whole)
    same_images, same_captions = clip_training_data(plain, images, captions, main=False)
    assert same_images is images and same_captions is captions


def test_timesteps_are_biased_to_the_noisiest_by_default_and_uniform_on_request():
    T = Config().train.num_train_timesteps
    uniform = config_from_dict({}, ["train.timestep_bias_multiplier=1"]).train
    assert timestep_weights(uniform) is None
    torch.manual_seed(0)
    t = sample_timesteps(None, T, 40000, "cpu")
    assert t.min() >= 0 and t.max() < T
    assert abs((t >= 500).float().mean().item() - 0.5) < 0.02
    assert abs((t >= 750).float().mean().item() - 0.25) < 0.02
    # uniform draws exactly what torch.randint draws, so runs from before the bias reproduce bit for bit
    torch.manual_seed(0)
    assert torch.equal(t, torch.randint(0, T, (40000,)))
    # the default: the noisiest half weighs 3 x 500 against 500 for the rest, three quarters of all draws
    t = sample_timesteps(timestep_weights(Config().train), T, 40000, "cpu")
    assert t.min() >= 0 and t.max() < T
    assert abs((t >= 500).float().mean().item() - 0.75) < 0.02
    biased = config_from_dict({}, ["train.timestep_bias_portion=0.25"]).train
    t = sample_timesteps(timestep_weights(biased), T, 40000, "cpu")
    # the noisiest quarter weighs 3 x 250 against 750 for the rest: half of all draws
    assert abs((t >= 750).float().mean().item() - 0.5) < 0.02
    assert abs((t < 250).float().mean().item() - 1 / 6) < 0.02


def test_values_from_token_embeddings_trains_a_unet_whose_values_read_them(tmp_path, tiny_dict):
    """The option reaches the exported UNet: its values read the appended token embeddings (the
    second half of the text features) and the model samples."""
    from diffusion.control.prompts import parse_prompt
    from diffusion.sampling.pipeline import Pipeline

    tiny_dict["model"]["values_from_token_embeddings"] = True
    tiny_dict["train"].update(max_steps=2, checkpoint_every=2, validate_every=2)
    out = tmp_path / "run"
    train(config_from_dict(tiny_dict), out)
    pipe = Pipeline.from_pretrained(out / "model")
    width = tiny_dict["text"]["width"]
    assert pipe.encoder.embedding_dim == 2 * width
    assert pipe.unet.config.value_context_start == width
    assert pipe.unet.mid_attention.cross_attention.to_v.in_features == width
    assert pipe.unet.mid_attention.cross_attention.to_k.in_features == 2 * width
    x, _ = pipe.sample_batch(
        [parse_prompt("a (red:0) circle")],
        [0],
        SamplingSettings(steps=2, guidance=3.0, sampler="dpm++"),
    )
    assert x.shape == (1, 3, 16, 16) and torch.isfinite(x).all()


# ---- image folders: streamed from disk ----------------------------------------------------------
def make_image_folder(root, count=10):
    """`count` random RGB images of assorted sizes (so random crops move) with 5 distinct captions."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    lines = []
    for i in range(count):
        size = (20 + 4 * (i % 3), 28 - 2 * (i % 2))  # (H, W)
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(root / f"{i}.png")
        lines.append(json.dumps({"file_name": f"{i}.png", "text": f"a picture of kind {i % 5}"}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


def make_masked_folder(root, count=6):
    """`count` transparent images 16 px high and of assorted widths (not resized at 16 px, so
    exact; random crops move), each a coloured object of random pixels (so any crop or flip shows)
    with its alpha as its mask, and a caption of two or three words."""
    rng = np.random.default_rng(1)
    (root / "masks").mkdir(parents=True)
    lines = []
    for i in range(count):
        size = (16, 20 + 4 * (i % 3))  # (H, W)
        alpha = np.where(rng.random(size) < 0.5, 255, 0).astype(np.uint8)
        colour = np.broadcast_to(np.array((200, 40 * i, 30), np.uint8), (*size, 3))
        Image.fromarray(np.dstack([colour, alpha]), "RGBA").save(root / f"{i}.png")
        Image.fromarray(alpha).save(root / "masks" / f"{i}.png")
        caption = ["red apple", "dog face", "keycap: *"][i % 3]
        lines.append(json.dumps({"file_name": f"{i}.png", "text": caption, "mask": f"masks/{i}.png"}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("folder") / "images")


def folder_config(tiny_dict, folder, cache, grounding=0.0, **data):
    """The tiny config on an image folder (random crops and flips on), both grounding weights
    set to `grounding`."""
    tiny_dict["data"].update(
        kind="imagefolder", path=str(folder), center_crop=False, random_flip=True, embedding_cache=str(cache), **data
    )
    tiny_dict["train"].update(grounding_weight=grounding, grounding_pixel_weight=grounding)
    return config_from_dict(tiny_dict)


def streaming_data(folder, cache, seed=0, workers=0, grounded=False, **options):
    """StreamingData over `folder`, with a tiny untrained CLIP text encoder; `grounded`: with
    each caption's grounding targets (`caption_targets`)."""
    from transformers import CLIPTextModel

    from diffusion.data.batches import StreamingData
    from diffusion.data.image_folder import ImageFolderDataset
    from diffusion.data.text_states import EmbeddingStore, cache_folder
    from diffusion.model.text_encoder import TextEncoder
    from diffusion.training.clip import clip_text_config, fit_tokenizer
    from diffusion.training.grounding import caption_targets

    dataset = ImageFolderDataset(folder, 16, **options)
    captions = dataset.captions()
    tokenizer = fit_tokenizer(captions, vocab_size=600, model_max_length=24)
    torch.manual_seed(0)
    model = CLIPTextModel(clip_text_config(tokenizer, 16, 1, 2, intermediate_size=32))
    distinct = sorted(set(captions) | {""})
    encoder = TextEncoder(tokenizer, model)
    store = EmbeddingStore.open(cache_folder(str(cache)), encoder, distinct, progress=False)
    rows = np.array([distinct.index(c) for c in captions])
    token_object = caption_targets(distinct, encoder.offsets) if grounded else None
    return StreamingData(dataset, store, rows, distinct.index(""), seed, workers, "cpu", token_object)


def take(data, count, first_draw=0, batch_size=3, world=1, rank=0):
    batches = data.batches(None, first_draw, batch_size, world, rank)
    taken = [next(batches) for _ in range(count)]
    batches.close()
    return taken


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x.x0, y.x0) and torch.equal(x.embeddings, y.embeddings)
        assert torch.equal(x.key_mask, y.key_mask)


def test_folder_batches_do_not_depend_on_the_number_of_workers(image_folder, tmp_path):
    data = {
        workers: streaming_data(image_folder, tmp_path, workers=workers, center_crop=False, random_flip=True)
        for workers in (0, 1, 2)
    }
    batches = {workers: take(d, 5) for workers, d in data.items()}
    assert_same_batches(batches[0], batches[1])
    assert_same_batches(batches[0], batches[2])
    assert batches[0][0].x0.shape == (3, 3, 16, 16) and batches[0][0].x0.dtype == torch.float32
    assert -1 <= batches[0][0].x0.min() and batches[0][0].x0.max() <= 1
    # a run resumed at draw 3 makes draws 3 and 4 again
    assert_same_batches(take(data[2], 2, first_draw=3), batches[0][3:])
    # two processes take the two halves of the global batch, crops and flips included
    halves = [take(data[0], 5, batch_size=3, world=2, rank=rank) for rank in (0, 1)]
    whole = take(data[0], 5, batch_size=6)
    for low, high, both in zip(*halves, whole):
        assert torch.equal(torch.cat([low.x0, high.x0]), both.x0)
        assert torch.equal(torch.cat([low.embeddings, high.embeddings]), both.embeddings)
    # the text states are those of each image's caption
    folder = data[0].folder
    for draw in range(5):
        index = [int(i) for i in np.random.default_rng([0, draw, 0]).integers(len(folder), size=3)]
        rows = data[0].caption_rows[index]
        assert torch.equal(batches[0][draw].embeddings, data[0].store.get(rows)[0])


def test_random_crops_and_flips_are_drawn_at_every_step_and_repeat_per_seed_and_step(tmp_path):
    folder = make_image_folder(tmp_path / "one", count=1)  # every draw picks the same image
    cache = tmp_path / "cache"
    crops = [batch.x0[0] for batch in take(streaming_data(folder, cache, center_crop=False), 12, batch_size=1)]
    assert len({crop.numpy().tobytes() for crop in crops}) >= 4  # drawn anew at each step
    again = take(streaming_data(folder, cache, center_crop=False), 12, batch_size=1)
    assert all(torch.equal(a, b.x0[0]) for a, b in zip(crops, again))  # the same (seed, step), the same crop
    other_seed = take(streaming_data(folder, cache, seed=1, center_crop=False), 12, batch_size=1)
    assert not all(torch.equal(a, b.x0[0]) for a, b in zip(crops, other_seed))

    flips = [batch.x0[0] for batch in take(streaming_data(folder, cache, random_flip=True), 12, batch_size=1)]
    distinct = {flip.numpy().tobytes(): flip for flip in flips}
    assert len(distinct) == 2  # the centre crop and its mirror image
    one, other = distinct.values()
    assert torch.equal(one.flip(-1), other)
    centred = take(streaming_data(folder, cache), 4, batch_size=1)
    assert len({batch.x0.numpy().tobytes() for batch in centred}) == 1


def test_resuming_an_image_folder_run_reproduces_it_exactly(image_folder, tmp_path, tiny_dict, capsys):
    """Steps 3-4 after a resume from step 2 (with another number of workers) give bit-identical
    weights; the second run reads the text states the first one wrote."""
    cache = tmp_path / "cache"
    first = tmp_path / "first"
    train(folder_config(copy.deepcopy(tiny_dict), image_folder, cache, workers=2), first)
    assert "text embeddings: 6 captions" in capsys.readouterr().out  # 5 captions and ""
    (cache_file,) = cache.iterdir()
    resumed = tmp_path / "resumed"
    shutil.copytree(first, resumed)
    train(
        folder_config(copy.deepcopy(tiny_dict), image_folder, cache, workers=0),
        resumed,
        resume=str(resumed / "checkpoints" / "step-000002"),
    )
    out = capsys.readouterr().out
    assert f"read from {cache_file}" in out and "resumed from" in out
    for name in ("model", "ema", "optimizer"):
        assert_same(weights(resumed, 4, name), weights(first, 4, name))
    assert_same(
        load_file(next((resumed / "model" / "unet").glob("*.safetensors"))),
        load_file(next((first / "model" / "unet").glob("*.safetensors"))),
    )
    assert any(not torch.equal(a, b) for a, b in zip(weights(first, 2).values(), weights(first, 4).values()))


def test_a_folder_with_masks_grounds_every_caption_word_on_its_image_mask(tmp_path):
    from diffusion.data.batches import drop_captions

    folder = make_masked_folder(tmp_path / "emoji")
    data = streaming_data(folder, tmp_path / "cache", grounded=True, center_crop=False, random_flip=True)
    for workers in (0, 1):  # the masks come back from a DataLoader worker too
        data.workers = workers
        for draw, batch in enumerate(take(data, 4)):
            index = np.random.default_rng([0, draw, 0]).integers(len(data.folder), size=3)
            assert batch.token_object.shape == (3, batch.key_mask.shape[1]) and batch.token_object.dtype == torch.long
            assert batch.object_masks.shape == (3, 1, 16, 16) and batch.object_masks.dtype == torch.float32
            for place, i in enumerate(index):
                # its caption's word tokens, right after the start token, name object 0; no other does
                expected = data.token_object[data.caption_rows[i]].long()
                assert torch.equal(batch.token_object[place], expected)
                words = int((expected == 0).sum())
                assert words >= 2 and (expected[1 : 1 + words] == 0).all()
                # the mask is the image's own, cropped and flipped with it: white exactly off the object
                mask = data.folder.mask(int(i), np.random.default_rng([0, draw, 1, place]))
                assert torch.equal(batch.object_masks[place, 0], torch.from_numpy(mask).float())
                assert torch.equal((batch.x0[place] == 1).all(dim=0), ~torch.from_numpy(mask))
    dropped = drop_captions(batch, torch.tensor([True, False, False]), data.empty)
    assert (dropped.token_object[0] == -1).all() and torch.equal(dropped.token_object[1:], batch.token_object[1:])
    # without grounding, the same folder's batches carry no targets
    assert take(streaming_data(folder, tmp_path / "cache"), 1)[0].token_object is None
    # an image without a mask, in a folder with some, grounds no token
    lines = (folder / "metadata.jsonl").read_text().splitlines()
    unmasked = json.loads(lines[0])
    del unmasked["mask"]
    (folder / "metadata.jsonl").write_text("\n".join([json.dumps(unmasked), *lines[1:]]) + "\n")
    data = streaming_data(folder, tmp_path / "cache", grounded=True)
    for draw, batch in enumerate(take(data, 6)):
        index = np.random.default_rng([0, draw, 0]).integers(len(data.folder), size=3)
        for place, i in enumerate(index):
            assert (batch.token_object[place] >= 0).any() == (i != 0)
            assert batch.object_masks[place].any() == (i != 0)


def test_grounding_on_a_folder_without_masks_is_a_one_line_error(image_folder, tmp_path, tiny_dict):
    cfg = folder_config(tiny_dict, image_folder, tmp_path / "cache", grounding=0.05)  # the config cannot tell
    assert cfg.train.grounding_weight == cfg.train.grounding_pixel_weight == 0.05
    out = tmp_path / "run"
    with pytest.raises(UserError, match="^train.grounding_weight needs object masks, and no image in") as error:
        train(cfg, out)
    assert "\n" not in str(error.value) and "set them to 0" in str(error.value) and not out.exists()


def test_training_with_grounding_on_a_masked_folder(tmp_path, tiny_dict, monkeypatch):
    from diffusion.training import loop

    seen = []
    step = loop.TrainStep.__call__

    def recorded(self, batch):
        loss, grounding = step(self, batch)
        seen.append((batch.token_object, grounding))
        return loss, grounding

    monkeypatch.setattr(loop.TrainStep, "__call__", recorded)
    folder = make_masked_folder(tmp_path / "emoji")
    model = train(folder_config(tiny_dict, folder, tmp_path / "cache", grounding=0.05, workers=0), tmp_path / "run")
    assert len(seen) == tiny_dict["train"]["max_steps"]
    for token_object, grounding in seen:
        assert (token_object == 0).any() and grounding is not None and 0 <= grounding.item() <= 1
    assert yaml.safe_load((model / "config.yaml").read_text())["train"]["grounding_weight"] == 0.05


def test_a_bad_embedding_cache_folder_fails_before_anything_is_written(image_folder, tmp_path, tiny_dict):
    (tmp_path / "afile").write_text("x")
    out = tmp_path / "run"
    with pytest.raises(UserError, match="^data.embedding_cache: cannot create the folder") as error:
        train(folder_config(tiny_dict, image_folder, tmp_path / "afile" / "cache"), out)
    assert "\n" not in str(error.value) and not out.exists()


@pytest.mark.parametrize(
    "value, message", [(-1, "data.workers must be 0 .* got -1"), ("two", "data.workers must be int, got 'two'")]
)
def test_bad_data_workers_is_a_one_line_error(value, message):
    with pytest.raises(UserError, match=message):
        config_from_dict({}, [f"data.workers={value}"])


def test_the_small_clip_sees_at_most_as_many_folder_images_as_it_draws(image_folder, tiny_dict, tmp_path):
    from diffusion.data.batches import folder_clip_data
    from diffusion.data.image_folder import ImageFolderDataset

    tiny_dict["text"].update(steps=2, batch_size=3)  # 6 draws, from a folder of 10
    cfg = folder_config(tiny_dict, image_folder, tmp_path)
    folder = ImageFolderDataset(image_folder, 16, center_crop=False, random_flip=True)
    images, captions = folder_clip_data(cfg, folder, progress=False)
    assert images.shape == (6, 3, 16, 16) and len(captions) == 6
    again, _ = folder_clip_data(cfg, folder, progress=False)
    assert torch.equal(images, again)  # a pure function of text.seed


def test_a_checkpoint_without_the_data_reading_keys_resumes(run_copy, tiny_dict, capsys):
    """Checkpoints written before data.workers and data.embedding_cache existed still resume; those
    keys, which do not change what a run computes, may differ."""
    state_file = run_copy / "checkpoints" / "step-000004" / "state.json"
    state = json.loads(state_file.read_text())
    for key in ("workers", "embedding_cache"):
        del state["config"]["data"][key]
    state_file.write_text(json.dumps(state))
    tiny_dict["train"]["max_steps"] = 6
    tiny_dict["data"]["workers"] = 0
    train(config_from_dict(tiny_dict), run_copy, resume="latest")
    assert "resumed from" in capsys.readouterr().out


def test_the_small_clip_learns_every_caption_whole_and_its_tokenizer_covers_the_unets(tiny_dict, tmp_path):
    """Captions that leave an attribute out are for the UNet; the small CLIP learns from the same
    scenes with every colour, shape and place named, and its tokenizer knows the UNet's words."""
    from diffusion.config import config_from_dict
    from diffusion.data.captions import clip_training_data
    from diffusion.model.text_encoder import TextEncoder

    tiny_dict["data"].update(omit_colour=0.5, omit_shape=0.5, omit_position=0.5)
    cfg = config_from_dict(tiny_dict)
    images, captions = build_dataset(cfg.data).render_all(progress=False)
    clip_images, clip_captions = clip_training_data(cfg, images, captions, main=False)
    assert any(" shape" in caption for caption in captions)  # the UNet's captions leave shapes out
    assert not any(" shape" in caption for caption in clip_captions)
    assert len(clip_images) == len(clip_captions) == len(captions)
    model = train(cfg, tmp_path / "run")
    tokenizer = TextEncoder.from_pretrained(model).tokenizer
    assert "shape</w>" in tokenizer.get_vocab()


def test_captions_leave_words_out_only_from_data_omit_from_on(tiny_dict, tmp_path):
    """data.omit_from: the first draws read whole captions, the later ones the same images with
    captions that leave the colour out, each with its own grounding targets; a run resumed after
    the switch reads the later captions from its first draw."""
    from diffusion.data.batches import prepare_data
    from diffusion.data.shapes import COLOURS
    from diffusion.data.text_states import EmbeddingCache
    from diffusion.training.grounding import grounding_targets
    from diffusion.training.loop import make_accelerator

    tiny_dict["data"].update(omit_colour=1.0, omit_shape=0.0, omit_position=0.0, omit_from=0.5)
    cfg = config_from_dict(tiny_dict)  # 4 steps: whole captions for steps 0-1, partial from step 2
    dataset = build_dataset(cfg.data)
    whole = build_dataset(config_from_dict({**tiny_dict, "data": {**tiny_dict["data"], "omit_colour": 0.0}}).data)
    data, encoder = prepare_data(cfg, dataset, tmp_path, make_accelerator(cfg, tmp_path))
    assert torch.equal(data.images, whole.render_all(progress=False)[0])
    offsets = lambda caption: encoder.tokenize(caption)["offsets"]  # noqa: E731
    phases = {False: whole.scenes(), True: dataset.scenes()}
    assert all(any(c in s.caption for c in COLOURS) for s in phases[False])
    assert not any(any(c in s.caption for c in COLOURS) for s in phases[True])
    cache = EmbeddingCache(encoder)

    def check(batch, index, later):
        scenes = [phases[later][i] for i in index.tolist()]
        expected, _ = cache.get([scene.caption for scene in scenes])
        assert torch.allclose(batch.embeddings, expected, atol=1e-5)
        assert torch.equal(batch.token_object, grounding_targets(scenes, offsets).long())
        assert torch.equal(batch.x0, data.images[index].float() / 127.5 - 1)

    batches, draws = data.batches(torch.Generator().manual_seed(5), 0, 4, 1, 0), torch.Generator().manual_seed(5)
    for draw in range(4):
        check(next(batches), torch.randint(len(data), (4,), generator=draws), later=draw >= 2)
    resumed, draws = data.batches(torch.Generator().manual_seed(6), 3, 4, 1, 0), torch.Generator().manual_seed(6)
    check(next(resumed), torch.randint(len(data), (4,), generator=draws), later=True)
    with pytest.raises(UserError, match="data.omit_from must be"):
        config_from_dict({"data": {"omit_from": 1.0}})


def test_a_hub_clip_that_cannot_load_names_the_offline_choice(tiny_dict, tmp_path, monkeypatch):
    """Offline, text.pretrained=<hub id> fails; the error says text.pretrained=null trains without it."""
    from diffusion.errors import UserError
    from diffusion.model.text_encoder import TextEncoder

    def offline(*args, **kwargs):
        raise UserError("could not load a CLIP text encoder from 'openai/clip-vit-base-patch32': the hub failed")

    monkeypatch.setattr(TextEncoder, "from_pretrained", offline)
    tiny_dict["text"]["pretrained"] = "openai/clip-vit-base-patch32"
    with pytest.raises(UserError, match=r"the hub failed; or train without it: text.pretrained=null trains the small"):
        train(config_from_dict(tiny_dict), tmp_path / "run")
