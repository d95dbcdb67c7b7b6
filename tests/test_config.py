"""Tests for diffusion/config.py: defaults, YAML files, dotted overrides and validation."""

import dataclasses
from pathlib import Path

import pytest
import yaml

from diffusion.config import Config, commented_defaults, config_from_dict, field_comments, load_config, parse_override
from diffusion.errors import UserError

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
CONFIGS = sorted(CONFIG_DIR.glob("*.yaml"))


def test_defaults_load_and_are_valid():
    cfg = load_config(None)
    assert cfg == Config()
    assert cfg.model.channels == [32, 64, 128]
    assert cfg.train.max_steps == 2400 and cfg.train.batch_size == 32 and cfg.train.lr == 2e-3
    assert cfg.text.pretrained is None
    assert isinstance(cfg.to_dict()["train"]["validation_prompts"], list)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)


def test_shipped_configs_exist():
    assert {p.name for p in CONFIGS} >= {"shapes.yaml", "shapes-gpu.yaml", "imagefolder.yaml"}


def test_shapes_yaml_matches_the_defaults():
    """configs/shapes.yaml documents the defaults: loading it must give exactly them, and it is
    written from config.py's fields and comments (python tools/write_default_config.py)."""
    assert load_config(CONFIG_DIR / "shapes.yaml") == Config()
    assert (CONFIG_DIR / "shapes.yaml").read_text() == commented_defaults()


def test_every_config_field_has_a_comment():
    for section in dataclasses.fields(Config):
        names = {f.name for f in dataclasses.fields(getattr(Config(), section.name))}
        commented = field_comments(type(getattr(Config(), section.name)))
        assert names == {n for n, c in commented.items() if c}, section.name


def test_yaml_file_values_are_merged_over_the_defaults(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  max_steps: 10\nmodel:\n  channels: [16, 32]\n  attention_resolutions: [16]\n")
    cfg = load_config(path)
    assert cfg.train.max_steps == 10
    assert cfg.model.channels == [16, 32]
    assert cfg.train.batch_size == Config().train.batch_size  # untouched keys keep their defaults


def test_overrides_apply_after_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  max_steps: 10\n")
    assert load_config(path, ["train.max_steps=20"]).train.max_steps == 20


@pytest.mark.parametrize(
    "override, key, expected",
    [
        ("train.max_steps=3000", "train.max_steps", 3000),
        ("train.lr=1e-4", "train.lr", 1e-4),
        ("train.lr=0.5", "train.lr", 0.5),
        ("train.lr=2", "train.lr", 2.0),
        ("model.channels=[16, 32, 64]", "model.channels", [16, 32, 64]),
        ("model.channels=[16,32,64]", "model.channels", [16, 32, 64]),
        (
            "train.validation_prompts=[a red circle, a blue square]",
            "train.validation_prompts",
            ["a red circle", "a blue square"],
        ),
        ("train.snr_gamma=null", "train.snr_gamma", None),
        ("train.snr_gamma=", "train.snr_gamma", None),
        ("text.pretrained=null", "text.pretrained", None),
        ("data.random_flip=true", "data.random_flip", True),
        ("text.mask_eos=false", "text.mask_eos", False),
        ("data.kind=shapes", "data.kind", "shapes"),
        ("text.hidden_layer=-2", "text.hidden_layer", -2),
    ],
)
def test_dotted_overrides_are_parsed_as_yaml(override, key, expected):
    cfg = config_from_dict({}, [override])
    section, name = key.split(".")
    value = getattr(getattr(cfg, section), name)
    assert value == expected and type(value) is type(expected)


def test_parse_override_reads_scientific_notation_as_a_number():
    assert parse_override("train.lr=1e-4") == ("train.lr", 1e-4)
    assert parse_override(" train.lr = 3 ") == ("train.lr", 3)


def test_override_without_equals_sign_is_a_user_error():
    with pytest.raises(UserError, match="train.max_steps"):
        config_from_dict({}, ["train.max_steps"])


def test_unknown_key_names_the_closest_valid_key():
    with pytest.raises(UserError) as error:
        config_from_dict({}, ["train.max_step=3"])
    assert "'train.max_step'" in str(error.value)
    assert "did you mean 'train.max_steps'" in str(error.value)


def test_unknown_key_in_a_yaml_file_names_the_closest_valid_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  chanels: [16]\n")
    with pytest.raises(UserError, match=r"model\.chanels.*model\.channels"):
        load_config(path)


def test_unknown_key_without_a_close_match_lists_the_valid_keys():
    with pytest.raises(UserError, match="valid: .*train.max_steps"):
        config_from_dict({}, ["train.zzzzzzzz=1"])


def test_unknown_section():
    with pytest.raises(UserError, match=r"unknown config key 'trian'.*'train'"):
        config_from_dict({}, ["trian.max_steps=3"])
    with pytest.raises(UserError, match="unknown config key 'optimizer'"):
        config_from_dict({"optimizer": {"lr": 1}})


def test_a_section_that_is_not_a_mapping():
    with pytest.raises(UserError, match="^train must be a mapping"):
        config_from_dict({"train": 5})


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.max_steps=abc", "train.max_steps"),
        ("train.max_steps=1.5", "train.max_steps"),
        ("train.max_steps=true", "train.max_steps"),  # a bool is not an int
        ("train.lr=fast", "train.lr"),
        ("model.channels=16", "model.channels"),
        ("model.channels=[16, x]", "model.channels[1]"),
        ("data.random_flip=3", "data.random_flip"),
        ("train.validation_prompts=[1]", "train.validation_prompts[0]"),
        ("train.snr_gamma=[1]", "train.snr_gamma"),
    ],
)
def test_wrong_type_names_the_key(override, key):
    with pytest.raises(UserError) as error:
        config_from_dict({}, [override])
    assert str(error.value).startswith(f"{key} must be")


@pytest.mark.parametrize(
    "override, key, fragment",
    [
        ("train.max_steps=-1", "train.max_steps", "positive"),
        ("train.max_steps=0", "train.max_steps", "positive"),
        ("train.batch_size=0", "train.batch_size", "positive"),
        ("text.steps=-5", "text.steps", "positive"),
        ("train.warmup_steps=-1", "train.warmup_steps", "negative"),
        ("train.lr=-1e-3", "train.lr", "positive"),
        ("train.lr=inf", "train.lr", "finite"),
        ("train.lr=nan", "train.lr", "finite"),
        ("train.validation_guidance=.inf", "train.validation_guidance", "finite"),
        ("train.cond_dropout=1.0", "train.cond_dropout", "[0, 1)"),
        ("train.ema_decay=-0.1", "train.ema_decay", "[0, 1)"),
        ("train.timestep_bias_portion=1.5", "train.timestep_bias_portion", "[0, 1)"),
        ("train.timestep_bias_multiplier=-2", "train.timestep_bias_multiplier", "negative"),
        ("train.mixed_precision=fp8", "train.mixed_precision", "auto, no, fp16, bf16"),
        ("train.prediction_type=x0", "train.prediction_type", "epsilon"),
        ("train.beta_schedule=cosine", "train.beta_schedule", "squaredcos_cap_v2"),
        ("data.kind=webdataset", "data.kind", "shapes, imagefolder"),
        ("model.attention_resolutions=[5]", "model.attention_resolutions", "[32, 16, 8]"),
        ("model.channels=[12, 24]", "model.channels", "multiples of 8"),
        ("model.channels=[]", "model.channels", "non-empty"),
        ("data.resolution=30", "data.resolution", "divisible"),
    ],
)
def test_invalid_values_are_user_errors_naming_the_key(override, key, fragment):
    with pytest.raises(UserError) as error:
        config_from_dict({}, [override])
    message = str(error.value)
    assert message.startswith(key) or key in message
    assert fragment in message


def test_timestep_bias_must_leave_a_timestep_to_train_on():
    # multiplier 0 skips the noisiest portion, which is valid until the portion rounds to every timestep
    assert config_from_dict({}, ["train.timestep_bias_multiplier=0", "train.timestep_bias_portion=0.5"])
    with pytest.raises(UserError, match="leaves no timestep to train on"):
        config_from_dict({}, ["train.timestep_bias_multiplier=0", "train.timestep_bias_portion=0.9999"])


def test_attention_resolution_must_be_a_level_of_the_resized_model():
    ok = config_from_dict({}, ["data.resolution=16", "model.channels=[16, 32]", "model.attention_resolutions=[8]"])
    assert ok.model.attention_resolutions == [8]
    with pytest.raises(UserError, match="model.attention_resolutions has 32"):
        config_from_dict({}, ["data.resolution=16", "model.channels=[16, 32]", "model.attention_resolutions=[32]"])


def test_missing_config_file(tmp_path):
    with pytest.raises(UserError, match="config file .*nope.yaml' not found"):
        load_config(tmp_path / "nope.yaml")


def test_a_folder_is_not_a_config_file(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_config(tmp_path)


def test_malformed_yaml_names_the_file_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  max_steps: 10\n  lr: [1, 2\n")
    with pytest.raises(UserError, match=r"bad.yaml' is not valid YAML at line \d+"):
        load_config(path)


def test_a_yaml_file_that_is_not_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- train\n- model\n")
    with pytest.raises(UserError, match="must hold a mapping"):
        load_config(path)


def test_an_empty_yaml_file_gives_the_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing here\n")
    assert load_config(path) == Config()


def test_grounding_is_off_by_itself_for_an_image_folder(tmp_path):
    # the shapes keep the grounding defaults; a folder, given no grounding key, needs no hand edits
    assert config_from_dict({}).train.grounding_weight == 0.05
    for cfg in (
        config_from_dict({}, ["data.kind=imagefolder"]),
        config_from_dict({"data": {"kind": "imagefolder"}}),
    ):
        assert cfg.train.grounding_weight == cfg.train.grounding_pixel_weight == 0
    config = tmp_path / "folder.yaml"
    config.write_text("data:\n  kind: imagefolder\ntrain:\n  lr: 0.001\n")
    assert load_config(config).train.grounding_weight == 0
    # the resolved config (written beside checkpoints) loads back as it was
    saved = tmp_path / "saved.yaml"
    saved.write_text(yaml.safe_dump(load_config(config).to_dict()))
    assert load_config(saved) == load_config(config)
    # the other train keys keep their defaults
    assert load_config(config).train.max_steps == Config().train.max_steps


def test_an_explicit_grounding_weight_with_a_folder_is_kept(tmp_path):
    # only the folder can say whether it has masks: the dataset checks that (test_training.py)
    cfg = config_from_dict({}, ["data.kind=imagefolder", "train.grounding_weight=0.1"])
    assert cfg.train.grounding_weight == 0.1 and cfg.train.grounding_pixel_weight == 0
    config = tmp_path / "folder.yaml"
    config.write_text("data:\n  kind: imagefolder\ntrain:\n  grounding_weight: 0.05\n  grounding_pixel_weight: 0.05\n")
    assert load_config(config).train.grounding_pixel_weight == 0.05
    with pytest.raises(UserError, match="train.grounding_pixel_weight is part of the grounding loss"):
        config_from_dict({}, ["data.kind=imagefolder", "train.grounding_pixel_weight=0.05"])


def test_values_from_token_embeddings_needs_them_appended():
    with pytest.raises(UserError, match="text.concat_token_embeddings=true"):
        config_from_dict({}, ["model.values_from_token_embeddings=true", "text.concat_token_embeddings=false"])
    assert config_from_dict({}, ["model.values_from_token_embeddings=true"]).model.values_from_token_embeddings


def test_token_value_resolutions_are_attention_levels_of_the_values_option():
    with pytest.raises(UserError, match="model.values_from_token_embeddings=true"):
        config_from_dict({}, ["model.token_value_resolutions=[16]"])
    with pytest.raises(UserError, match=r"has 32, but cross-attention runs at \[16, 8\] px"):
        config_from_dict({}, ["model.values_from_token_embeddings=true", "model.token_value_resolutions=[32]"])
    with pytest.raises(UserError, match="is empty, which would apply the option nowhere"):
        config_from_dict({}, ["model.values_from_token_embeddings=true", "model.token_value_resolutions=[]"])
    cfg = config_from_dict({}, ["model.values_from_token_embeddings=true", "model.token_value_resolutions=[8]"])
    assert cfg.model.token_value_resolutions == [8]


def test_the_pixel_loss_needs_the_grounding_loss():
    with pytest.raises(UserError, match="train.grounding_weight > 0"):
        config_from_dict({}, ["train.grounding_weight=0", "train.grounding_pixel_weight=0.05"])
    assert config_from_dict({}, ["train.grounding_pixel_weight=0.05"]).train.grounding_pixel_weight == 0.05


def test_a_bare_no_is_the_mixed_precision_choice_not_false(tmp_path):
    # YAML 1.1 reads `no` as false; for train.mixed_precision it names the choice "no" (float32)
    assert config_from_dict({}, ["train.mixed_precision=no"]).train.mixed_precision == "no"
    config = tmp_path / "fp32.yaml"
    config.write_text("train:\n  mixed_precision: no\n")
    assert load_config(config).train.mixed_precision == "no"
    with pytest.raises(UserError, match="train.grounding_weight must be float"):
        config_from_dict({}, ["train.grounding_weight=no"])  # other fields still reject a boolean


def test_class_defaults_agree_with_the_config():
    """UNet, TextEncoder and ShapesDataset built from their own defaults are what the default
    config builds: one set of defaults, not three that drift apart."""
    import inspect

    from diffusion.data.captions import whole_captions
    from diffusion.data.datasets import build_dataset
    from diffusion.data.shapes import ShapesDataset
    from diffusion.model.text_encoder import TextEncoder
    from diffusion.model.unet import UNet, unet_settings

    cfg = Config()
    unet_defaults = {
        name: p.default
        for name, p in inspect.signature(UNet.__init__).parameters.items()
        if p.default is not inspect.Parameter.empty
    }
    for name, value in unet_settings(cfg, context_dim=unet_defaults["context_dim"]).items():
        assert unet_defaults[name] == value, name
    encoder_defaults = inspect.signature(TextEncoder.__init__).parameters
    for name in ("hidden_layer", "mask_eos", "concat_token_embeddings"):
        assert encoder_defaults[name].default == getattr(cfg.text, name), name
    ours, configured = ShapesDataset(), build_dataset(cfg.data)
    for name in (
        "resolution",
        "num_samples",
        "min_objects",
        "max_objects",
        "object_weights",
        "seed",
        "holdout",
        "holdout_mode",
    ):
        assert getattr(ours, name) == getattr(configured, name), name
    # the config's colour, shape and position omission acts only from data.omit_from on: before
    # that its captions are the class default's
    assert cfg.data.omit_from > 0 and configured.omission.leaves_words_out()
    assert ours.omission == build_dataset(whole_captions(cfg.data)).omission
