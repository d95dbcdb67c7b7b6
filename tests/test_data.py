"""Tests for diffusion/data/datasets.py: the factory that picks a dataset from the config."""

from types import SimpleNamespace

import pytest
from PIL import Image

from diffusion.data.datasets import build_dataset
from diffusion.data.image_folder import ImageFolderDataset
from diffusion.data.shapes import ShapesDataset
from diffusion.errors import UserError

# ---------------------------------------------------------------------------------------------
# Factory


def data_config(**overrides):
    values = dict(
        kind="shapes",
        resolution=32,
        num_samples=10,
        min_objects=1,
        max_objects=2,
        object_weights=[1, 3, 0, 0],
        omit_colour=0.0,
        omit_shape=0.0,
        omit_position=0.0,
        omit_size=0.5,
        omit_max_objects=4,
        seed=0,
        holdout=["red square"],
        path=None,
        center_crop=True,
        random_flip=False,
        skip_bad=False,
    )
    return SimpleNamespace(**{**values, **overrides})


def test_build_dataset(tmp_path):
    shapes = build_dataset(data_config())
    assert isinstance(shapes, ShapesDataset) and len(shapes) == 10
    assert shapes.holdout == {("red", "square")} and shapes.holdout_mode == "exclude"
    assert shapes.object_weights == [1, 3, 0, 0]

    Image.new("RGB", (24, 20), (200, 10, 10)).save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("a caption")
    folder = build_dataset(data_config(kind="imagefolder", path=str(tmp_path), resolution=16))
    assert isinstance(folder, ImageFolderDataset) and folder.captions() == ["a caption"]

    with pytest.raises(UserError, match="data.path is required when data.kind is imagefolder"):
        build_dataset(data_config(kind="imagefolder"))
    with pytest.raises(UserError, match="data.kind"):
        build_dataset(data_config(kind="cifar"))
