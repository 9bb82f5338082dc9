"""Image files as tensors: folder trees of JPEG/PNG files, archives of them, decoding to
uint8 arrays (cached on disk, so an epoch is not spent decoding JPEGs), and the usual
transforms for 32x32 RGB inputs."""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import tarfile
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision.transforms import v2

from clbench.errors import UserError

CACHE_ENV = "CLBENCH_CACHE"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
# Channel statistics used for normalisation (the usual published values).
NORMALISATION = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "svhn": ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "clbench")


class ImageArrayDataset(Dataset):
    """Images in memory (N x C x H x W: decoded uint8, or already normalised floats);
    `targets` is what Avalanche reads; `classes`, the class names by id, where they are
    more than the ids."""

    def __init__(self, images: torch.Tensor, targets, classes: list[str] | None = None):
        self.images, self.classes = images, classes
        self.targets = torch.as_tensor(targets, dtype=torch.long).tolist()

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        return self.images[index], self.targets[index]


class ImageFileDataset(Dataset):
    """Image files decoded on every access (what the cache avoids)."""

    def __init__(self, paths: list[Path], targets, size: int, classes: list[str]):
        self.paths, self.size, self.classes = paths, size, classes
        self.targets = torch.as_tensor(targets, dtype=torch.long).tolist()

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        return torch.from_numpy(decode(self.paths[index], self.size)).permute(2, 0, 1), self.targets[index]


def decode(path: Path, size: int) -> np.ndarray:
    """An image file as a size x size x 3 uint8 array (centre-cropped to a square, then
    resized with antialiasing)."""
    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
            side = min(image.size)
            left, top = (image.width - side) // 2, (image.height - side) // 2
            image = image.crop((left, top, left + side, top + side))
            if side != size:
                image = image.resize((size, size), Image.Resampling.BICUBIC, reducing_gap=None)
            return np.array(image, dtype=np.uint8)
    except (OSError, UnidentifiedImageError) as error:
        raise UserError(f"cannot decode image {path} ({error}); the dataset is corrupt: replace the file") from None


def decoded_images(paths: list[Path], size: int, cache: bool) -> torch.Tensor | None:
    """All images decoded as one N x 3 x size x size uint8 tensor, read from or written to
    the cache (keyed by the files' paths, sizes and modification times); None when
    `cache` is off (the caller then decodes lazily)."""
    if not cache:
        return None
    key = hashlib.sha256(str(size).encode())
    for path in paths:
        stat = path.stat()
        key.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    file = cache_root() / "decoded" / f"{key.hexdigest()[:24]}.npy"
    if file.exists():
        return torch.from_numpy(np.load(file))
    # Contiguous N x C x H x W: a transposed view would slow every training step down.
    array = np.ascontiguousarray(np.stack([decode(path, size) for path in paths]).transpose(0, 3, 1, 2))
    file.parent.mkdir(parents=True, exist_ok=True)
    temporary = file.with_name(f".{file.name}.{os.getpid()}.partial")
    with open(temporary, "wb") as handle:
        np.save(handle, array)
    os.replace(temporary, file)
    return torch.from_numpy(array)


def image_dataset(paths: list[Path], targets, size: int, cache: bool, classes: list[str]) -> Dataset:
    images = decoded_images(paths, size, cache)
    return (ImageArrayDataset(images, targets, classes) if images is not None
            else ImageFileDataset(paths, targets, size, classes))


def unpacked(archive: Path) -> Path:
    """The folder an archive unpacks to, in the cache (unpacked once; never next to the
    archive, which may be read-only)."""
    target = cache_root() / "unpacked" / archive.name.removesuffix(".tar.gz").removesuffix(".tgz").removesuffix(".tar")
    if target.exists():
        return target
    # Unpack beside the target and rename it into place: other processes never see half a tree.
    temporary = target.with_name(f".{target.name}.{os.getpid()}.partial")
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(temporary, filter="data")
        os.rename(temporary, target)
    except (tarfile.TarError, EOFError, gzip.BadGzipFile, zlib.error) as error:
        raise UserError(f"cannot unpack {archive} ({error}); the archive is corrupt: download it again") from None
    except OSError:
        if not target.exists():  # not just another process that got there first
            raise
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    return target


def scan_class_folders(folder: Path) -> dict[str, list[Path]]:
    """`folder/<class>/**/<image>` -> {class: sorted image paths}."""
    classes = {}
    for class_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
        files = sorted(p for p in class_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if files:
            classes[class_dir.name] = files
    return classes


def transforms(statistics: str, augment: bool) -> tuple[v2.Compose, v2.Compose]:
    """(train, eval) transforms of uint8 C x H x W tensors: scaled to [0, 1] and
    normalised; with `augment`, training adds a 4-pixel-padded random crop and a
    horizontal flip (the usual CIFAR augmentation)."""
    mean, std = NORMALISATION[statistics]
    to_float = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    augmentation = [v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip()] if augment else []
    return v2.Compose(augmentation + to_float), v2.Compose(to_float)
