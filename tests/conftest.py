"""Shared test setup: the tiny config, one tiny trained run per session, a CLI runner."""

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# The models here are tiny: a second thread only adds synchronisation (several times slower on 2 cores).
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]

# A model small enough to train (text encoder included) in a few seconds on one CPU core.
TINY = {
    "model": {"channels": [16, 32], "attention_resolutions": [8], "attention_heads": 2},
    "data": {"resolution": 16, "num_samples": 64},
    "text": {"steps": 3, "batch_size": 16, "width": 32, "layers": 1, "vocab_size": 600},
    "train": {
        "max_steps": 4,
        "batch_size": 4,
        "warmup_steps": 0,
        "checkpoint_every": 2,
        "validate_every": 4,
        "keep_checkpoints": 2,
        "validation_steps": 2,
        "validation_prompts": ["a red circle on the left", "a blue square"],
    },
}


def pytest_configure(config):
    # diffusers' schedulers trip a numpy 2 deprecation on every set_timesteps; it is not ours to fix
    config.addinivalue_line("filterwarnings", "ignore:__array__ implementation:DeprecationWarning")
    config.addinivalue_line("markers", "slow: a second or more on one core; `pytest -m 'not slow'` leaves it out")


# The fast tier, `python -m pytest -q -m "not slow"`: the prompt parser, the controllers, the
# attention maths, the pipeline and training on the tiny model, in about a minute. What it leaves
# out took a second or more each on one core (`pytest --durations=0`): the command lines run as
# subprocesses, the browser, torch.compile, evaluate.py end to end, hypothesis' long searches,
# trained-model effects. CI runs everything.
SLOW_FILES = {
    "test_app.py",
    "test_app_load.py",
    "test_compiled.py",
    "test_faults.py",
    "test_multiprocess.py",
    "test_notebook.py",
    "test_readme.py",
    "test_recipe.py",
    "test_seeds.py",
    "test_training_curve.py",
    "test_weight_effect.py",
}
SLOW_TESTS = {
    "test_cli.py": {
        "test_sample_output_path_that_cannot_be_written",
        "test_sample_peak_memory_does_not_grow_with_the_number_of_images",
        "test_sample_rejects_bad_arguments_and_keeps_the_old_grid",
        "test_sample_rejects_bad_model_folders_and_keeps_the_old_grid",
        "test_sample_streams_many_images_and_grids_only_the_first_64",
        "test_sample_with_a_too_long_prompt_warns_once_and_succeeds",
        "test_sample_writes_a_grid_and_images_with_metadata",
        "test_sample_writes_attention_panels_and_raw_maps",
        "test_train_rejects_bad_arguments_in_one_line",
        "test_train_resume_from_a_corrupt_checkpoint",
        "test_tuned_malloc_reuses_freed_memory_instead_of_faulting_it_in_again",
    },
    "test_detector.py": {
        "test_accuracy_on_generator_scenes",
        "test_accuracy_with_noise",
        "test_the_generators_single_objects_are_clean_objects",
    },
    "test_evaluation.py": {
        "test_evaluate_cli_bad_input_is_one_line",
        "test_evaluate_cli_swap_options_and_pictures",
        "test_evaluate_cli_writes_json_and_pictures",
        "test_the_generators_own_images_pass_almost_every_prompt",
    },
    "test_folder_evaluation.py": {
        "test_evaluate_cli_with_data_writes_the_report_and_its_picture",
        "test_evaluate_folder_end_to_end_on_a_tiny_model",
    },
    "test_fuzz.py": {
        "test_a_parsed_prompt_rendered_back_parses_to_the_same_words_and_weights",
        "test_any_command_line_exits_0_or_2_with_one_line_or_is_accepted",
        "test_any_image_folder_loads_its_good_files_and_names_each_bad_one",
        "test_any_overrides_load_a_valid_config_or_raise_one_line",
        "test_any_prompt_parses_or_is_a_syntax_error_with_a_caret",
        "test_any_yaml_file_loads_a_valid_config_or_raises_one_line",
    },
    "test_fetch.py": {"test_the_emoji_config_trains_on_a_fetched_folder_offline_with_no_hand_edits"},
    "test_pipeline.py": {
        "test_ddim_and_euler_take_the_same_ode_step",
        "test_diffusers_loads_an_exported_model",
        "test_a_model_exported_before_the_package_had_folders_loads_both_ways",
    },
    "test_report.py": {
        "test_evaluate_measures_the_weight_response",
        "test_evaluate_samples_no_faithfulness_scenes_for_the_other_parts",
        "test_evaluate_scores_only_the_categories_it_is_given",
        "test_evaluate_smoke_on_the_tiny_model",
        "test_evaluate_sweeps_the_edit_steps_and_checks_the_value_it_is_given",
    },
    "test_shapes.py": {"test_captions_do_not_depend_on_the_process_hash_seed"},
    "test_stock.py": {
        "test_sample_py_draws_weights_maps_and_swaps_from_a_stock_folder",
        "test_the_app_builds_its_page_on_a_stock_folder",
    },
    "test_unet2d.py": {  # each trains the tiny unet2d run (once per module) or runs a command line
        "test_a_unet2d_run_trains_with_grounding_and_exports_a_folder_that_loads",
        "test_an_unknown_unet_class_in_a_folder_is_one_line",
        "test_diffusers_loads_an_exported_unet2d",
        "test_resuming_checks_the_kind_and_takes_checkpoints_from_before_it_for_unet",
        "test_sample_and_evaluate_accept_a_unet2d_folder",
        "test_the_editor_renders_a_unet2d_uncompiled_and_says_why",
        "test_the_exported_unet2d_gives_the_images_of_the_trained_one",
    },
    "test_training.py": {
        "test_captions_leave_words_out_only_from_data_omit_from_on",
        "test_the_small_clip_learns_every_caption_whole_and_its_tokenizer_covers_the_unets",
        "test_values_from_token_embeddings_trains_a_unet_whose_values_read_them",
    },
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        file = item.path.name
        if file in SLOW_FILES or item.originalname in SLOW_TESTS.get(file, ()):
            item.add_marker(pytest.mark.slow)


@pytest.fixture
def tiny_dict():
    """The tiny config as a nested dict (a fresh copy: edit it freely)."""
    return copy.deepcopy(TINY)


@pytest.fixture
def tiny_overrides():
    """The tiny config as command-line overrides: ["model.channels=[16, 32]", ...]."""
    return [f"{section}.{key}={json.dumps(value)}" for section, values in TINY.items() for key, value in values.items()]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A finished 4-step run of the tiny config (checkpoints at steps 2 and 4). Read-only: copy it to change it."""
    from diffusion.config import config_from_dict
    from diffusion.training.loop import train

    out = tmp_path_factory.mktemp("tiny") / "run"
    train(config_from_dict(copy.deepcopy(TINY)), out)
    return out


@pytest.fixture
def run_copy(tiny_run, tmp_path):
    """A copy of the session's tiny run (checkpoints at steps 2 and 4, an export) that a test may change."""
    copy = tmp_path / "run"
    shutil.copytree(tiny_run, copy)
    return copy


@pytest.fixture(scope="session")
def tiny_model(tiny_run):
    """The exported model folder of the tiny run."""
    return tiny_run / "model"


@pytest.fixture
def run_cli():
    """Run `python <script> args...` from the repository root; returns the CompletedProcess."""

    def run(script, *args, timeout=300):
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        return subprocess.run(
            [sys.executable, script, *map(str, args)],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    return run
