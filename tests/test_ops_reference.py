"""The reference ops: formulas, and the validation every backend relies on."""

import pytest
import torch
import torch.nn.functional as F

from fastddpm import Schedule, ops


def test_q_sample_formula():
    s = Schedule.linear()
    x0, noise, t = torch.randn(4, 3, 5, 5), torch.randn(4, 3, 5, 5), torch.tensor([0, 10, 500, 999])
    xt, n = ops.q_sample(x0, t, s.table("noising", "cpu"), noise, backend="reference")
    expected = s.sqrt_abar[t].float()[:, None, None, None] * x0 + \
        s.sqrt_one_minus_abar[t].float()[:, None, None, None] * noise
    assert n is noise and torch.allclose(xt, expected, rtol=1e-6, atol=1e-6)


def test_ddpm_step_formula_and_out():
    s = Schedule.linear()
    coeffs = s.table("step", "cpu", sampler="ddpm", variance="fixed_small")
    x, m, z = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    t = torch.tensor([0, 1, 999])
    c = coeffs[t][:, :, None, None, None]
    x0 = (c[:, 0] * x - c[:, 1] * m).clamp(-1, 1)
    expected = c[:, 2] * x0 + c[:, 3] * x + c[:, 4] * m + c[:, 5] * z
    out = torch.empty_like(x)
    got = ops.ddpm_step(x, m, t, coeffs, z, clip=1.0, out=out, backend="reference")
    assert got is out and torch.allclose(out, expected, rtol=1e-6, atol=1e-6)


def test_group_norm_act_is_silu_of_group_norm_of_x_plus_temb():
    x, temb = torch.randn(2, 8, 5, 3), torch.randn(2, 8)
    w, b = torch.randn(8), torch.randn(8)
    got = ops.group_norm_act(x, w, b, 4, 1e-6, temb, backend="reference")
    assert torch.allclose(got, F.silu(F.group_norm(x + temb[:, :, None, None], 4, w, b, 1e-6)), atol=1e-6)
    assert torch.allclose(ops.group_norm_act(x, w, b, 4, 1e-6, act=None, backend="reference"), F.group_norm(x, 4, w, b, 1e-6))


def test_op_validation_errors():
    s = Schedule.linear()
    coeffs, table = s.table("step", "cpu", sampler="ddpm"), s.table("noising", "cpu")
    x = torch.randn(2, 1, 4, 4)
    with pytest.raises(ValueError, match="t: expected an int64"):
        ops.ddpm_step(x, x, torch.tensor([1.0, 2.0]), coeffs)
    with pytest.raises(ValueError, match="t: expected"):
        ops.q_sample(x, torch.tensor([1, 2, 3]), table)
    with pytest.raises(ValueError, match="model_out"):
        ops.ddpm_step(x, torch.randn(2, 1, 4, 5), torch.tensor([1, 2]), coeffs)
    with pytest.raises(ValueError, match="coeffs"):
        ops.ddpm_step(x, x, torch.tensor([1, 2]), table)
    with pytest.raises(ValueError, match="clip"):
        ops.ddpm_step(x, x, torch.tensor([1, 2]), coeffs, clip=-1.0)
    with pytest.raises(ValueError, match="groups"):
        ops.group_norm_act(torch.randn(2, 6, 4, 4), None, None, 4)
    with pytest.raises(ValueError, match="temb"):
        ops.group_norm_act(torch.randn(2, 8, 4, 4), None, None, 4, temb=torch.randn(2, 4))
    with pytest.raises(ValueError, match="backend"):
        ops.ddpm_step(x, x, torch.tensor([1, 2]), coeffs, backend="cuda-magic")
