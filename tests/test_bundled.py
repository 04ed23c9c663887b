"""The pretrained MNIST model shipped inside the package."""

import torch

import fastddpm


def test_bundled_mnist_model_is_installed_and_loads():
    assert "mnist" in fastddpm.bundled_models()
    ddpm = fastddpm.load("mnist")
    assert ddpm.model.config == fastddpm.PRESETS["mnist"]
    assert ddpm.schedule.T == 1000 and ddpm.prediction == "eps" and ddpm.step > 1000


def test_bundled_model_samples_look_like_mnist():
    x = fastddpm.sample("mnist", 8, steps=50, seed=0, progress=False)
    assert x.shape == (8, 1, 32, 32) and x.min() >= -1 and x.max() <= 1
    border = torch.cat([x[..., :3, :].flatten(), x[..., -3:, :].flatten()])
    centre = x[..., 8:24, 8:24]
    assert border.mean() < -0.9  # the padded background stays black
    assert (centre > 0).float().mean() > 0.05  # and there is ink in the middle
