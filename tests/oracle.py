"""Helpers the op tests share: memory layouts, and the comparison with the reference by dtype."""

import torch

LOW = (torch.float16, torch.bfloat16)


def layout(x: torch.Tensor, kind: str) -> torch.Tensor:
    """The same values as x in a given memory layout."""
    if kind == "channels_last" and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    if kind == "strided":  # non-contiguous: a transposed copy viewed back
        return x.transpose(-1, -2).contiguous().transpose(-1, -2)
    return x.contiguous()


def assert_close_by_dtype(fast, ref_fn, args32, dtype, rtol=1e-5, atol=1e-5):
    """fp32/fp64: close to the reference. 16-bit: error vs the fp32 reference at most 2x (plus
    one ulp-sized slack) the error of the reference run in the low dtype (DESIGN.md section 6)."""
    exact = ref_fn(*args32)
    if dtype in LOW:
        low = ref_fn(*[a.to(dtype) if torch.is_tensor(a) and a.is_floating_point() and a.dim() > 2 else a
                       for a in args32])
        ref_err = (low.float() - exact).abs().max().item()
        err = (fast.float() - exact).abs().max().item()
        ulp = torch.finfo(dtype).eps * max(1.0, exact.abs().max().item())
        assert err <= 2 * ref_err + ulp, (err, ref_err)
    else:
        torch.testing.assert_close(fast.to(exact.dtype), exact, rtol=rtol, atol=atol)
