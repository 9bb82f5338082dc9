"""Loaders: each reads one dataset from a data root into (train, test, source), where
train and test are datasets with a `targets` list (and `classes`, the class names by id,
where they are more than the ids) and `source` says what was read.

Downloads happen only where the network is reachable; torchvision's checksums are kept
where it has them. Missing or corrupt data is a one-line `UserError` naming the expected
files and how to get them.
"""

from __future__ import annotations

import os
import socket
from importlib import resources
from pathlib import Path
from typing import Callable
from urllib.parse import urlparse

import numpy as np
import torch
from clbench.datasets.images import ImageArrayDataset, image_dataset, scan_class_folders, unpacked
from torch.utils.data import Dataset

from clbench.errors import UserError

DATA_ROOT_ENV = "CLBENCH_DATA_ROOT"
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081  # the usual MNIST normalisation (as Avalanche's SplitMNIST)


def default_data_root() -> Path:
    return Path(os.environ.get(DATA_ROOT_ENV) or Path.home() / ".cache" / "clbench" / "data")


def mnist_tensors(images: np.ndarray | torch.Tensor, labels) -> ImageArrayDataset:
    """uint8 N x 28 x 28 images -> normalised float N x 1 x 28 x 28."""
    x = torch.as_tensor(images, dtype=torch.float32).unsqueeze(1) / 255.0
    return ImageArrayDataset((x - MNIST_MEAN) / MNIST_STD, labels)


def load_split_mnist_mini(_root: Path, _cache: bool) -> tuple[Dataset, Dataset, str]:
    path = resources.files("clbench.datasets") / "split_mnist_mini" / "split_mnist_mini.npz"
    with resources.as_file(path) as file, np.load(file) as data:
        train = mnist_tensors(data["x_train"], data["y_train"])
        test = mnist_tensors(data["x_test"], data["y_test"])
    return train, test, "MNIST subset shipped with clbench (1,000 train / 200 test images per class)"


MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def network_reachable(url: str, timeout: float = 3.0) -> bool:
    host = urlparse(url).hostname
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def missing_error(name: str, expected: str, where: Path, how: str) -> UserError:
    return UserError(f"{name} not found: expected {expected} in {where}, and no network to download it; {how}, "
                     f"or pass --data-root DIR (or set {DATA_ROOT_ENV}) pointing at the folder that holds it")


def torchvision_splits(name: str, folder: Path, files: list[str], url: str, expected: str, how: str,
                       open_split: Callable[[bool, bool], Dataset]) -> tuple[Dataset, Dataset]:
    """(train, test) from `open_split(train, download)`, a torchvision dataset with its
    checksums; missing files are downloaded only when `url`'s host is reachable."""
    missing = [file for file in files if not (folder / file).is_file()]
    if missing and not network_reachable(url):
        raise missing_error(name, expected, folder, how)
    try:
        return tuple(open_split(train, bool(missing)) for train in (True, False))
    except Exception as error:  # torchvision: RuntimeError on a checksum mismatch; scipy or pickle errors on bad files
        raise UserError(f"{name} files in {folder} are corrupt or not the official ones ({error}); "
                        "delete them and download again") from None


def load_mnist(root: Path, _cache: bool) -> tuple[Dataset, Dataset, str]:
    from torchvision.datasets import MNIST

    folder = root / "MNIST" / "raw"
    train, test = torchvision_splits(
        "MNIST", folder, list(MNIST_FILES), MNIST.mirrors[0], ", ".join(MNIST_FILES),
        "put the uncompressed files there (torchvision's layout: <root>/MNIST/raw)",
        lambda train, download: MNIST(str(root), train=train, download=download))
    return mnist_tensors(train.data, train.targets), mnist_tensors(test.data, test.targets), f"MNIST, full ({folder})"


def load_svhn(root: Path, _cache: bool) -> tuple[Dataset, Dataset, str]:
    from torchvision.datasets import SVHN

    folder = root / "SVHN"
    files = [SVHN.split_list[split][1] for split in ("train", "test")]
    train, test = torchvision_splits(
        "SVHN", folder, files, SVHN.split_list["train"][0], " and ".join(files),
        "download them from http://ufldl.stanford.edu/housenumbers/ into that folder",
        lambda train, download: SVHN(str(folder), split="train" if train else "test", download=download))
    return (ImageArrayDataset(torch.from_numpy(train.data), train.labels),
            ImageArrayDataset(torch.from_numpy(test.data), test.labels), f"SVHN ({folder})")


def load_cifar10(root: Path, _cache: bool) -> tuple[Dataset, Dataset, str]:
    from torchvision.datasets import CIFAR10

    folder = root / CIFAR10.base_folder
    files = [name for name, _ in CIFAR10.train_list + CIFAR10.test_list] + [CIFAR10.meta["filename"]]
    train, test = torchvision_splits(
        "CIFAR-10", folder, files, CIFAR10.url, f"the python pickles ({', '.join(files)})",
        f"unpack {CIFAR10.url} into {root}",
        lambda train, download: CIFAR10(str(root), train=train, download=download))
    as_tensor = lambda data: torch.from_numpy(data).permute(0, 3, 1, 2).contiguous()  # noqa: E731
    return (ImageArrayDataset(as_tensor(train.data), train.targets, train.classes),
            ImageArrayDataset(as_tensor(test.data), test.targets, test.classes), f"CIFAR-10, official pickles ({folder})")


def folder_or_archive(root: Path, folder: str, archive: str) -> Path | None:
    """`root/folder`, or the unpacked `root/archive` (also looked for in root/archives)."""
    if (root / folder).is_dir():
        return root / folder
    for candidate in (root / archive, root / "archives" / archive):
        if candidate.is_file():
            return unpacked(candidate)
    return None


def image_folder_splits(folder: Path, size: int, cache: bool, classes: list[str] | None = None):
    """`folder/train/<class>/...` and `folder/test/<class>/...` as datasets of size x size
    images; class ids follow `classes` (default: the sorted training class names)."""
    splits = {}
    for split in ("train", "test"):
        if not (folder / split).is_dir():
            raise UserError(f"{folder} has no {split}/ folder; expected {folder}/train/<class>/<image> "
                            f"and {folder}/test/<class>/<image>")
        splits[split] = scan_class_folders(folder / split)
    classes = classes or sorted(splits["train"])
    if not classes or set(classes) - set(splits["test"]) or set(classes) - set(splits["train"]):
        raise UserError(f"{folder}/train and {folder}/test must hold image folders of the same classes "
                        f"(train: {len(splits['train'])} classes, test: {len(splits['test'])})")
    return class_datasets(splits, classes, size, cache)


def class_datasets(tree: dict[str, dict[str, list[Path]]], classes: list[str], size: int, cache: bool):
    """[train, test] datasets from {split: {class: image paths}}; class ids follow `classes`."""
    datasets = []
    for split in ("train", "test"):
        paths = [path for name in classes for path in tree[split][name]]
        targets = [index for index, name in enumerate(classes) for _ in tree[split][name]]
        datasets.append(image_dataset(paths, targets, size, cache, classes))
    return datasets


def load_image_folder(root: Path, cache: bool) -> tuple[Dataset, Dataset, str]:
    folder = unpacked(root) if root.is_file() else root
    if not folder.is_dir():
        raise UserError(f"image folder {root} does not exist; pass --data-root DIR with DIR/train/<class>/<image> "
                        "and DIR/test/<class>/<image> (or a .tar.gz of such a tree)")
    train, test = image_folder_splits(folder, 32, cache)
    return train, test, f"image folder {root}"


def load_cifar10_jpeg(root: Path, cache: bool) -> tuple[Dataset, Dataset, str]:
    folder = folder_or_archive(root, "cifar10-jpeg", "cifar10-jpeg.tar.gz")
    if folder is None:
        raise UserError(f"CIFAR-10 JPEG copy not found: expected {root}/cifar10-jpeg/{{train,test}}/<class>/*.jpg "
                        f"or the archive cifar10-jpeg.tar.gz in {root} or {root}/archives; "
                        "pass --data-root DIR pointing at the folder that holds it")
    train, test = image_folder_splits(folder, 32, cache, CIFAR10_CLASSES)
    return train, test, f"CIFAR-10, JPEG-q75 copy ({folder})"


CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]

# ImageNet-50: the first 50 wnids of Tiny-ImageNet's wnids.txt (all ILSVRC-2012 classes),
# in that order; tasks are consecutive groups of 10 unless --shuffle-classes.
IMAGENET50_WNIDS = (
    "n02124075 n04067472 n04540053 n04099969 n07749582 n01641577 n02802426 n09246464 n07920052 n03970156 "
    "n03891332 n02106662 n03201208 n02279972 n02132136 n04146614 n07873807 n02364673 n04507155 n03854065 "
    "n03838899 n03733131 n01443537 n07875152 n03544143 n09428293 n03085013 n02437312 n07614500 n03804744 "
    "n04265275 n02963159 n02486410 n01944390 n09256479 n02058221 n04275548 n02321529 n02769748 n02099712 "
    "n07695742 n02056570 n02281406 n01774750 n02509815 n03983396 n07753592 n04254777 n02233338 n04008634"
).split()


def load_imagenet50(root: Path, cache: bool) -> tuple[Dataset, Dataset, str]:
    """From an ILSVRC-2012 folder (root/imagenet/train/<wnid>/, root/imagenet/val/<wnid>/)
    if there is one, else from Tiny-ImageNet (root/tiny-imagenet-200, or its archive
    tiny-imagenet-50.tar.gz / tiny-imagenet-200.tar.gz in root or root/archives)."""
    if (root / "imagenet" / "train").is_dir():
        folder = root / "imagenet"
        split = {"train": "train", "test": "val"}
        tree = {name: scan_class_folders(folder / split[name]) for name in split}
        source = f"ILSVRC-2012 ({folder}), resized to 32x32"
    else:
        folder = (folder_or_archive(root, "tiny-imagenet-200", "tiny-imagenet-50.tar.gz")
                  or folder_or_archive(root, "tiny-imagenet-200", "tiny-imagenet-200.tar.gz"))
        if folder is None:
            raise UserError(f"ImageNet-50 not found: expected an ILSVRC-2012 folder {root}/imagenet/{{train,val}}/<wnid>/ "
                            f"or Tiny-ImageNet at {root}/tiny-imagenet-200 (or tiny-imagenet-50.tar.gz in {root} "
                            f"or {root}/archives); pass --data-root DIR pointing at the folder that holds it")
        if (folder / "tiny-imagenet-200").is_dir():
            folder = folder / "tiny-imagenet-200"
        tree = {"train": scan_class_folders(folder / "train"), "test": tiny_imagenet_val(folder / "val")}
        source = f"Tiny-ImageNet ({folder}), 64x64 resized to 32x32"
    missing = [wnid for wnid in IMAGENET50_WNIDS if wnid not in tree["train"] or wnid not in tree["test"]]
    if missing:
        raise UserError(f"ImageNet-50 in {folder} lacks {len(missing)} of its 50 classes (first: {missing[0]}); "
                        "the class list is clbench.datasets.IMAGENET50_WNIDS")
    train, test = class_datasets(tree, IMAGENET50_WNIDS, 32, cache)
    return train, test, source


def tiny_imagenet_val(folder: Path) -> dict[str, list[Path]]:
    """Tiny-ImageNet's val/images/*.JPEG with labels from val/val_annotations.txt."""
    annotations = folder / "val_annotations.txt"
    if not annotations.is_file():
        raise UserError(f"Tiny-ImageNet validation labels not found: expected {annotations}")
    by_class: dict[str, list[Path]] = {}
    for line in annotations.read_text().splitlines():
        if line.strip():
            name, wnid = line.split("\t")[:2]
            by_class.setdefault(wnid, []).append(folder / "images" / name)
    return {wnid: sorted(paths) for wnid, paths in by_class.items()}


