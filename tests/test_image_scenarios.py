"""SVHN, CIFAR-10, ImageNet-50 and image-folder scenarios on small files written here in
the real on-disk formats."""

import hashlib
import pickle
import tarfile

import numpy as np
import pandas as pd
import pytest
import torch
from clbench.datasets.images import decoded_images
from clbench.datasets.loaders import IMAGENET50_WNIDS
from clbench.datasets.scenarios import build_scenario
from PIL import Image
from scipy.io import savemat
from torchvision.datasets import CIFAR10, SVHN

from clbench.cli import main
from clbench.errors import UserError

rng = np.random.default_rng(0)


@pytest.fixture(autouse=True)
def cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("CLBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("clbench.datasets.loaders.network_reachable", lambda url, timeout=3.0: False)


def md5(path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def check_split(scenario, n_tasks, per_task, setting):
    assert len(scenario.task_classes) == n_tasks and all(len(c) == per_task for c in scenario.task_classes)
    assert sorted(c for task in scenario.task_classes for c in task) == list(range(n_tasks * per_task))
    for stream in (scenario.benchmark.train_stream, scenario.benchmark.test_stream):
        for index, experience in enumerate(stream):
            x, y, t = experience.dataset[0]
            assert x.shape == (3, 32, 32) and x.dtype == torch.float32
            labels = set(experience.dataset.targets)
            if setting == "task":
                assert t == index and labels <= set(range(per_task))
            else:
                assert t == 0 and labels <= set(scenario.task_classes[index])


def write_svhn(folder, per_class=3):
    folder.mkdir(parents=True)
    for split in ("train", "test"):
        labels = np.repeat(np.arange(1, 11), per_class)  # SVHN stores digit 0 as label 10
        images = rng.integers(0, 256, (32, 32, 3, len(labels)), dtype=np.uint8)
        savemat(folder / SVHN.split_list[split][1], {"X": images, "y": labels[:, None].astype(np.uint8)})


@pytest.mark.parametrize("setting", ["task", "class"])
def test_split_svhn_from_mat_files(setting, tmp_path, monkeypatch):
    write_svhn(tmp_path / "SVHN")
    split_list = {split: [url, name, md5(tmp_path / "SVHN" / name)] for split, (url, name, _) in SVHN.split_list.items()
                  if split != "extra"}
    monkeypatch.setattr(SVHN, "split_list", split_list)  # our small files pass torchvision's checksum test
    scenario = build_scenario("split_svhn", setting, tmp_path)
    check_split(scenario, 5, 2, setting)
    assert len(scenario.benchmark.train_stream[0].dataset) == 6  # digits 0 and 1, 3 images each


def test_svhn_files_that_are_not_the_official_ones_are_an_error(tmp_path):
    write_svhn(tmp_path / "SVHN")
    with pytest.raises(UserError, match="corrupt or not the official"):
        build_scenario("split_svhn", "task", tmp_path)


def test_missing_svhn_offline_names_files_and_source(tmp_path):
    with pytest.raises(UserError) as error:
        build_scenario("split_svhn", "task", tmp_path)
    message = str(error.value)
    assert "train_32x32.mat" in message and "test_32x32.mat" in message and "ufldl.stanford.edu" in message


def write_cifar10(root, per_class=2):
    folder = root / CIFAR10.base_folder
    folder.mkdir(parents=True)
    for name, _ in CIFAR10.train_list + CIFAR10.test_list:
        labels = list(np.repeat(np.arange(10), per_class))
        batch = {"data": rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8), "labels": labels}
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / CIFAR10.meta["filename"]).write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}))
    return folder


@pytest.mark.parametrize("setting", ["task", "class"])
def test_split_cifar10_from_pickles(setting, tmp_path, monkeypatch):
    folder = write_cifar10(tmp_path)
    monkeypatch.setattr(CIFAR10, "train_list", [[n, md5(folder / n)] for n, _ in CIFAR10.train_list])
    monkeypatch.setattr(CIFAR10, "test_list", [[n, md5(folder / n)] for n, _ in CIFAR10.test_list])
    monkeypatch.setattr(CIFAR10, "meta", {**CIFAR10.meta, "md5": md5(folder / CIFAR10.meta["filename"])})
    scenario = build_scenario("split_cifar10", setting, tmp_path)
    check_split(scenario, 5, 2, setting)
    assert len(scenario.benchmark.train_stream[0].dataset) == 5 * 2 * 2  # 5 batches, 2 classes, 2 each


def test_corrupt_cifar10_is_an_error(tmp_path):
    write_cifar10(tmp_path)
    with pytest.raises(UserError, match="corrupt"):
        build_scenario("split_cifar10", "task", tmp_path)


def write_images(folder, count, size=8):
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{index}.JPEG")


@pytest.mark.parametrize("setting", ["task", "class"])
def test_imagenet50_from_an_ilsvrc_folder(setting, tmp_path):
    for wnid in IMAGENET50_WNIDS:
        write_images(tmp_path / "imagenet" / "train" / wnid, 2, size=40)
        write_images(tmp_path / "imagenet" / "val" / wnid, 1, size=40)
    scenario = build_scenario("imagenet50", setting, tmp_path)
    check_split(scenario, 5, 10, setting)
    assert "ILSVRC-2012" in scenario.source


def write_tiny_imagenet(root):
    folder = root / "tiny-imagenet-200"
    (folder / "val" / "images").mkdir(parents=True)
    lines = []
    for index, wnid in enumerate(IMAGENET50_WNIDS + ["n99999999"]):  # an extra class is ignored
        write_images(folder / "train" / wnid / "images", 2, size=64)
        image = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
        Image.fromarray(image).save(folder / "val" / "images" / f"val_{index}.JPEG")
        lines.append(f"val_{index}.JPEG\t{wnid}\t0\t0\t63\t63")
    (folder / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return folder


def test_imagenet50_from_a_tiny_imagenet_archive(tmp_path):
    folder = write_tiny_imagenet(tmp_path / "src")
    (tmp_path / "data" / "archives").mkdir(parents=True)
    with tarfile.open(tmp_path / "data" / "archives" / "tiny-imagenet-50.tar.gz", "w:gz") as tar:
        tar.add(folder, arcname="tiny-imagenet-200")
    scenario = build_scenario("imagenet50", "class", tmp_path / "data")
    check_split(scenario, 5, 10, "class")
    assert "Tiny-ImageNet" in scenario.source
    assert sum(len(e.dataset) for e in scenario.benchmark.test_stream) == 50
    assert not (tmp_path / "data" / "archives" / "tiny-imagenet-200").exists()  # unpacked in the cache only


def test_corrupt_archive_is_a_clear_error(tmp_path):
    (tmp_path / "archives").mkdir()
    (tmp_path / "archives" / "cifar10-jpeg.tar.gz").write_bytes(b"\x1f\x8b truncated")
    with pytest.raises(UserError, match="corrupt"):
        build_scenario("split_cifar10_jpeg", "task", tmp_path)
    assert not (tmp_path / "cache" / "unpacked" / "cifar10-jpeg").exists()


def test_missing_imagenet50_names_both_layouts(tmp_path):
    with pytest.raises(UserError) as error:
        build_scenario("imagenet50", "task", tmp_path)
    assert "imagenet/{train,val}/<wnid>" in str(error.value) and "tiny-imagenet-200" in str(error.value)


def write_folder(root, classes=6, per_class=3):
    for split in ("train", "test"):
        for c in range(classes):
            write_images(root / split / f"class{c}", per_class, size=36)
    return root


def test_image_folder_splits_by_classes_per_task_and_seeded_order(tmp_path):
    root = write_folder(tmp_path / "folder")
    scenario = build_scenario("image_folder", "task", root, classes_per_task=3)
    check_split(scenario, 2, 3, "task")
    orders = {str(build_scenario("image_folder", "class", root, seed=s, shuffle_classes=True,
                                 classes_per_task=2).task_classes) for s in range(4)}
    assert len(orders) > 1
    with pytest.raises(UserError, match="classes-per-task"):
        build_scenario("image_folder", "task", root, classes_per_task=4)


def test_cached_and_decoded_images_are_identical(tmp_path):
    root = write_folder(tmp_path / "folder")
    cached, lazy = (build_scenario("image_folder", "class", root, cache=c) for c in (True, False))
    assert list((tmp_path / "cache" / "decoded").glob("*.npy"))
    a, b = (s.benchmark.test_stream[1].dataset.eval() for s in (cached, lazy))
    assert all(torch.equal(a[i][0], b[i][0]) for i in range(len(a)))


def test_the_data_fingerprint_names_the_images_whether_cached_or_not(tmp_path):
    root = write_folder(tmp_path / "folder")
    cached, lazy = (build_scenario("image_folder", "class", root, cache=c) for c in (True, False))
    other = build_scenario("image_folder", "class", write_folder(tmp_path / "other"))
    assert cached.data_fingerprint == lazy.data_fingerprint != other.data_fingerprint
    assert cached.class_names == lazy.class_names == [f"class{c}" for c in range(6)]


def test_decoded_images_are_contiguous_whether_fresh_or_from_the_cache(tmp_path):
    paths = sorted((write_folder(tmp_path / "folder") / "train").rglob("*.JPEG"))
    fresh, cached = decoded_images(paths, 32, True), decoded_images(paths, 32, True)
    assert fresh.shape == (len(paths), 3, 32, 32) and fresh.is_contiguous() and cached.is_contiguous()
    assert torch.equal(fresh, cached)


def test_corrupt_image_is_a_clear_error(tmp_path):
    root = write_folder(tmp_path / "folder")
    (root / "train" / "class1" / "0.JPEG").write_bytes(b"not a jpeg")
    with pytest.raises(UserError, match="corrupt"):
        build_scenario("image_folder", "task", root)


def test_image_folder_run_end_to_end(tmp_path):
    root = write_folder(tmp_path / "folder", classes=4, per_class=8)
    assert main(["run", "--scenario", "image_folder", "--data-root", str(root), "--backbone", "small_cnn",
                 "--width", "4", "--setting", "class", "--results-dir", str(tmp_path / "runs")]) == 0
    run_dir = tmp_path / "runs" / "image_folder" / "class" / "naive" / "seed0"
    assert (run_dir / "COMPLETED").exists()
    assert "backbone: small_cnn" in (run_dir / "config.yaml").read_text()
    tasks = pd.read_csv(run_dir / "tasks.csv")
    assert tasks.values.tolist() == [[1, 0, "class0"], [1, 1, "class1"], [2, 2, "class2"], [2, 3, "class3"]]


def test_missing_image_folder_is_an_error(tmp_path, capsys):
    assert main(["run", "--scenario", "image_folder", "--data-root", str(tmp_path / "nowhere")]) == 2
    assert "train/<class>/<image>" in capsys.readouterr().err
