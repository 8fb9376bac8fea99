"""Images for `sinklora tic-train` / `tic-eval` (docs/tic.md): Fashion-MNIST from Debian's
``dataset-fashion-mnist`` package, or a folder of images with one subdirectory per class.

Both give :class:`ImageSplits`: the raw uint8 images of a train and a test split, which
:meth:`ImageSplits.tensors` resizes (bilinear) to one resolution and scales to [0, 1].
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..usage import MissingInput, UsageError

__all__ = ["FASHION_MNIST", "FASHION_MNIST_DIR", "FASHION_MNIST_CLASSES", "ImageSplits", "load_dataset",
           "load_fashion_mnist", "load_image_folder", "read_idx", "resize"]

FASHION_MNIST = "fashion-mnist"
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot")
INSTALL_HINT = "install it with scripts/install_data.sh (apt-get install dataset-fashion-mnist)"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
HELD_OUT_EVERY = 6  # a folder without train/ and test/: every 6th image of a class (by name) is a test image


@dataclass
class ImageSplits:
    """Train and test images: each a list of uint8 ``[C, h, w]`` tensors (any sizes) or one uint8
    ``[N, C, h, w]`` tensor, with int64 labels."""

    train_images: list | torch.Tensor
    train_labels: torch.Tensor
    test_images: list | torch.Tensor
    test_labels: torch.Tensor
    classes: tuple[str, ...]
    channels: int

    def tensors(self, split: str, resolution: int, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``split`` ("train" or "test") as float ``[N, C, resolution, resolution]`` in [0, 1] and
        its labels; ``limit``: the first ``limit`` images only."""
        images, labels = (self.train_images, self.train_labels) if split == "train" else (self.test_images,
                                                                                            self.test_labels)
        if limit is not None:
            images, labels = images[:limit], labels[:limit]
        if isinstance(images, torch.Tensor):
            return resize(images, resolution), labels
        return torch.cat([resize(image[None], resolution) for image in images]), labels


def resize(images: torch.Tensor, resolution: int) -> torch.Tensor:
    """uint8 ``[N, C, h, w]`` -> float ``[N, C, resolution, resolution]`` in [0, 1] (bilinear;
    antialiased when shrinking)."""
    floats = images.float() / 255.0
    if tuple(images.shape[-2:]) == (resolution, resolution):
        return floats
    shrink = resolution < max(images.shape[-2:])
    return F.interpolate(floats, size=(resolution, resolution), mode="bilinear", align_corners=False,
                         antialias=shrink).clamp_(0.0, 1.0)


def read_idx(path: Path) -> np.ndarray:
    """An idx-ubyte file (gzipped, as Fashion-MNIST ships it) as a uint8 array of its shape."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise UsageError(f"--dataset: {path} is not an idx file of unsigned bytes")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise UsageError(f"--dataset: {path} holds {body.size} bytes for the shape {shape}")
    return body.reshape(shape)


def load_fashion_mnist(directory: Path = FASHION_MNIST_DIR) -> ImageSplits:
    """The 60,000 training and 10,000 test images (1 x 28 x 28) of Fashion-MNIST."""
    parts = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        for kind, name in (("images", "idx3"), ("labels", "idx1")):
            path = Path(directory) / f"{prefix}-{kind}-{name}-ubyte.gz"
            if not path.is_file():
                raise MissingInput(f"--dataset {FASHION_MNIST}: {path} is missing; {INSTALL_HINT}")
            parts[split, kind] = torch.from_numpy(read_idx(path).copy())
    return ImageSplits(train_images=parts["train", "images"][:, None], train_labels=parts["train", "labels"].long(),
                       test_images=parts["test", "images"][:, None], test_labels=parts["test", "labels"].long(),
                       classes=FASHION_MNIST_CLASSES, channels=1)


def _class_files(directory: Path) -> dict[str, list[Path]]:
    classes = {}
    for sub in sorted(p for p in directory.iterdir() if p.is_dir()):
        files = sorted(p for p in sub.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if files:
            classes[sub.name] = files
    return classes


def _read_image(path: Path, mode: str) -> torch.Tensor:
    from PIL import Image

    try:
        with Image.open(path) as image:
            array = np.asarray(image.convert(mode))
    except OSError as e:
        raise UsageError(f"--dataset: cannot read the image {path}: {e}") from None
    array = array[:, :, None] if array.ndim == 2 else array
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def _is_grey(path: Path) -> bool:
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.mode in ("1", "L", "LA", "I", "I;16", "F")
    except OSError as e:
        raise UsageError(f"--dataset: cannot read the image {path}: {e}") from None


def load_image_folder(directory) -> ImageSplits:
    """Images in ``DIR/CLASS/*`` (any sizes and formats PIL reads), or in ``DIR/train/CLASS/*`` and
    ``DIR/test/CLASS/*``. Without train/ and test/, every 6th image of a class (sorted by name)
    is a test image. Grey when every image is grey, else RGB."""
    directory = Path(directory).expanduser()
    if not directory.is_dir():
        raise MissingInput(f"--dataset: no such directory: {directory} (give {FASHION_MNIST!r} or a folder of "
                           f"class subdirectories)")
    if (directory / "train").is_dir() and (directory / "test").is_dir():
        train, test = _class_files(directory / "train"), _class_files(directory / "test")
        if set(test) - set(train):
            raise UsageError(f"--dataset: {directory}/test has classes that train/ lacks: "
                             f"{', '.join(sorted(set(test) - set(train)))}")
    else:
        by_class = _class_files(directory)
        train = {name: [p for i, p in enumerate(files) if i % HELD_OUT_EVERY != HELD_OUT_EVERY - 1]
                 for name, files in by_class.items()}
        test = {name: [p for i, p in enumerate(files) if i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1]
                for name, files in by_class.items()}
    classes = tuple(sorted(train))
    if len(classes) < 2:
        raise UsageError(f"--dataset: {directory} needs at least 2 class subdirectories with images, found "
                         f"{len(classes)}")
    if not any(test.values()):
        raise UsageError(f"--dataset: {directory} has no test images (a class needs {HELD_OUT_EVERY} images or "
                         f"more, or give train/ and test/ subdirectories)")
    paths = [p for files in train.values() for p in files] + [p for files in test.values() for p in files]
    mode = "L" if all(_is_grey(p) for p in paths) else "RGB"

    def read(split: dict) -> tuple[list, torch.Tensor]:
        # round-robin over the classes, so that the first N images (--limit-train) hold every class
        ranked = [(i, classes.index(name), p) for name, files in split.items() for i, p in enumerate(files)]
        pairs = [(p, label) for _, label, p in sorted(ranked)]
        return [_read_image(p, mode) for p, _ in pairs], torch.tensor([label for _, label in pairs], dtype=torch.long)

    train_images, train_labels = read(train)
    test_images, test_labels = read(test)
    return ImageSplits(train_images=train_images, train_labels=train_labels, test_images=test_images,
                       test_labels=test_labels, classes=classes, channels=1 if mode == "L" else 3)


def load_dataset(name: str) -> ImageSplits:
    """``"fashion-mnist"`` or the path of an image folder (:func:`load_image_folder`)."""
    return load_fashion_mnist() if name == FASHION_MNIST else load_image_folder(name)
