"""Bundled datasets, arrays and image folders, scaled to [-1, 1]."""

import numpy as np
import pytest
import torch

from fastddpm.data import array_to_images, load_dataset, load_digits_data, load_mnist_data


def test_digits():
    x, y = load_digits_data()
    assert x.shape == (1797, 1, 8, 8) and x.dtype == torch.float32
    assert x.min() == -1 and x.max() == 1 and set(y.tolist()) == set(range(10))


def test_mnist_is_padded_to_32_with_background():
    x, y = load_mnist_data()
    assert x.shape == (5000, 1, 32, 32) and x.min() == -1 and x.max() == 1
    assert bool((x[:, :, :2] == -1).all()) and bool((x[:, :, :, -2:] == -1).all())
    assert torch.bincount(y).tolist() == [500] * 10


@pytest.mark.parametrize("shape,expected", [((5, 6, 7), (5, 1, 6, 7)), ((5, 6, 7, 3), (5, 3, 6, 7)),
                                            ((5, 3, 6, 7), (5, 3, 6, 7))])
def test_array_layouts(shape, expected):
    a = np.random.default_rng(0).integers(0, 256, shape).astype(np.uint8)
    x = array_to_images(a)
    assert x.shape == expected and x.min() >= -1 and x.max() <= 1


def test_array_value_ranges():
    assert array_to_images(np.ones((2, 4, 4), np.float32)).max() == 1
    assert array_to_images(np.zeros((2, 4, 4), np.float32)).min() == -1
    assert array_to_images(-np.ones((2, 4, 4), np.float32)).min() == -1
    with pytest.raises(ValueError, match=r"\[0, 1\] or \[-1, 1\]"):
        array_to_images(np.full((2, 4, 4), 3.0))
    with pytest.raises(ValueError, match="shape"):
        array_to_images(np.zeros((4, 4)))


def test_npz_and_folder(tmp_path):
    from PIL import Image

    a = np.random.default_rng(0).integers(0, 256, (3, 8, 8)).astype(np.uint8)
    np.savez(tmp_path / "d.npz", images=a)
    assert load_dataset(str(tmp_path / "d.npz")).shape == (3, 1, 8, 8)
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(2):
        Image.fromarray(np.full((10, 12, 3), 40 * i, np.uint8)).save(folder / f"{i}.png")
    x = load_dataset(str(folder), resolution=8, channels=3)
    assert x.shape == (2, 3, 8, 8)
    with pytest.raises(ValueError, match="data"):
        load_dataset("cifar-ten")
