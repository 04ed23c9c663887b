"""Device helpers."""

import pytest
import torch

from fastddpm.utils import resolve_device, same_device


def test_same_device():
    assert same_device("cpu", torch.device("cpu"))
    assert not same_device("cpu", "meta")
    if torch.cuda.is_available():
        assert same_device("cuda", "cuda:0") == (torch.cuda.current_device() == 0)
        assert resolve_device("cuda").index is not None


def test_resolve_device_rejects_unknown_devices():
    with pytest.raises(ValueError, match="device: expected"):
        resolve_device("gpu")
