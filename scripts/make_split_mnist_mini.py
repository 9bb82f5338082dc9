"""Build the embedded `split_mnist_mini` subset from the MNIST idx files.

Usage: python scripts/make_split_mnist_mini.py ../shared/data datasets/split_mnist_mini/split_mnist_mini.npz

Takes the first N_TRAIN training and N_TEST test images of every digit, in file order,
so the subset is reproducible from the original files.
"""

import sys
from pathlib import Path

import numpy as np
from torchvision.datasets import MNIST

N_TRAIN, N_TEST = 1000, 200


def first_per_class(dataset: MNIST, per_class: int) -> tuple[np.ndarray, np.ndarray]:
    labels = dataset.targets.numpy()
    index = np.sort(np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in range(10)]))
    return dataset.data.numpy()[index], labels[index].astype(np.uint8)


def main(root: str, out: str) -> None:
    x_train, y_train = first_per_class(MNIST(root, train=True, download=False), N_TRAIN)
    x_test, y_test = first_per_class(MNIST(root, train=False, download=False), N_TEST)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    print(f"wrote {out}: {len(x_train)} train, {len(x_test)} test images")


if __name__ == "__main__":
    main(*sys.argv[1:])
