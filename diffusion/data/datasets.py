"""Training data: `build_dataset` picks the dataset a config's `data` section describes.

Both datasets (`shapes.ShapesDataset`, the default, and `image_folder.ImageFolderDataset`) yield
the same items, `{"pixel_values": (3, H, W) float32 in [-1, 1], "caption": str, "index": int}`,
and offer `captions()` (every caption, without loading pixels). A shapes set is rendered whole
into memory for training (`render_all()`); an image folder is decoded batch by batch from disk
(`batches.StreamingData`). Which captions of a shapes set each stage of training reads is the
caption curriculum's (captions.py).
"""

from __future__ import annotations

from torch.utils.data import Dataset

from diffusion.data.image_folder import ImageFolderDataset
from diffusion.data.shapes import Omission, ShapesDataset
from diffusion.errors import UserError, one_line


def build_dataset(data_config, grounded: bool = False) -> Dataset:
    """The dataset described by `data_config`, the config's `data` section: any object with
    attributes kind ("shapes" or "imagefolder"), resolution, num_samples, min_objects,
    max_objects, object_weights, omit_colour, omit_shape, omit_position, omit_size, seed, holdout
    (list of "colour shape"), path, center_crop, random_flip, skip_bad.
    Shapes training data always excludes the holdout pairs.
    grounded: the grounding loss will read the objects' masks (train.grounding_weight > 0); the
    shapes draw theirs, a folder must name them in its metadata, else a one-line UserError."""
    kind = data_config.kind
    if kind == "shapes":
        return ShapesDataset(
            resolution=data_config.resolution,
            num_samples=data_config.num_samples,
            min_objects=data_config.min_objects,
            max_objects=data_config.max_objects,
            seed=data_config.seed,
            holdout=data_config.holdout,
            object_weights=data_config.object_weights,
            omission=Omission(
                data_config.omit_colour,
                data_config.omit_shape,
                data_config.omit_position,
                data_config.omit_size,
                data_config.omit_max_objects,
            ),
        )
    if kind == "imagefolder":
        if data_config.path is None:
            raise UserError(
                "data.path is required when data.kind is imagefolder; set it to a folder of captioned images"
            )
        folder = ImageFolderDataset(
            data_config.path,
            data_config.resolution,
            center_crop=data_config.center_crop,
            random_flip=data_config.random_flip,
            skip_bad=data_config.skip_bad,
        )
        if grounded and not folder.masked:
            # Only the folder can say whether it has masks, so this is checked here, not in config.py.
            raise UserError(
                one_line(
                    f"train.grounding_weight needs object masks, and no image in {data_config.path} has one "
                    '(a "mask" path on its metadata.jsonl line, as python -m diffusion.data.fetch writes); '
                    "remove train.grounding_weight and train.grounding_pixel_weight (grounding is then off "
                    "by itself) or set them to 0"
                )
            )
        return folder
    raise UserError(f"unknown data.kind {kind!r}; use 'shapes' or 'imagefolder'")
