"""``fastddpm edit reconstruct|interpolate|denoise|inpaint|progressive|shared``: the edits of
:mod:`fastddpm.edits` on PNGs or bundled dataset items, written as PNG grids."""

from __future__ import annotations

import argparse
import time

from .cli_args import image_file, non_negative_int, positive_int

KINDS = ("reconstruct", "interpolate", "denoise", "inpaint", "progressive", "shared")
REGIONS = ("left", "right", "top", "bottom", "center")


def _ints(text: str):
    try:
        return [int(v) for v in text.split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers such as 100,250,500, got {text!r}") from None


def _floats(text: str):
    try:
        return [float(v) for v in text.split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers such as 0,0.5,1, got {text!r}") from None


def add_parser(sub) -> None:
    """The ``edit`` subcommand and its options."""
    e = sub.add_parser("edit", help="edit images with the diffusion process (reconstruct, interpolate, denoise, ...)")
    e.add_argument("kind", choices=KINDS)
    e.add_argument("--model", default="mnist", help="checkpoint directory or bundled model name")
    e.add_argument("--input", nargs="+", default=["mnist:0-7"],
                   help="PNG files, or bundled items such as mnist:0-7 (default) or mnist:0,5,9")
    e.add_argument("--input-b", nargs="+", default=None, help="interpolate: the second image of each pair")
    e.add_argument("--out", type=image_file, default="edit.png", help="the image grid (.png)")
    e.add_argument("--t", type=_ints, default=None,
                   help="reconstruct: t values, one row each (default 100,250,500,750); interpolate: one t "
                        "(default 500); shared: latents' t (default 250,500,750,1000)")
    e.add_argument("--lambdas", type=_floats, default=[0, 0.25, 0.5, 0.75, 1.0], help="interpolate: mix weights")
    e.add_argument("--mode", default=None, help="interpolate: linear | slerp; denoise: ancestral | posterior_mean")
    e.add_argument("--add-noise", type=float, default=None, help="denoise: add Gaussian noise of this std first")
    e.add_argument("--sigma", type=float, default=None, help="denoise: the noise std (default: estimated)")
    e.add_argument("--mask", default=None, help="inpaint: a PNG, white where pixels are known")
    e.add_argument("--region", choices=REGIONS, default="right",
                   help="inpaint without --mask: the half (or the center square) to fill")
    e.add_argument("--resample", type=positive_int, default=1, help="inpaint: RePaint resampling count")
    e.add_argument("--jump", type=positive_int, default=10, help="inpaint: RePaint jump length (steps)")
    e.add_argument("--n", type=positive_int, default=4, help="progressive: images")
    e.add_argument("--every", type=positive_int, default=None, help="progressive: steps between frames")
    e.add_argument("--samples", type=positive_int, default=4, help="shared: completions per latent")
    e.add_argument("--steps", type=positive_int, default=None, help="reverse steps (respaced; default: all)")
    e.add_argument("--sampler", choices=["ddpm", "ddim"], default="ddpm")
    e.add_argument("--eta", type=float, default=0.0)
    e.add_argument("--seed", type=non_negative_int, default=0)
    e.add_argument("--scale", type=positive_int, default=2, help="pixel upscaling of the PNG")
    e.add_argument("--device", default="cpu")
    e.add_argument("--threads", type=positive_int, default=None, help="CPU threads for torch")
    e.add_argument("--quiet", action="store_true", help="no progress bars")
    e.set_defaults(func=cmd_edit)


def _region_mask(region: str, h: int, w: int):
    import torch

    known = torch.ones(h, w)
    if region == "left":
        known[:, : w // 2] = 0
    elif region == "right":
        known[:, w // 2:] = 0
    elif region == "top":
        known[: h // 2] = 0
    elif region == "bottom":
        known[h // 2:] = 0
    else:
        known[h // 4: h - h // 4, w // 4: w - w // 4] = 0
    return known


def cmd_edit(args) -> int:
    """Run one edit and write its PNG grid (rows as the kind's help says)."""
    import torch

    from . import edits
    from .images import read_images, save_grid
    from .sampling import image_shape, resolve_ddpm
    from .utils import resolve_device

    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.monotonic()
    device = resolve_device(args.device)
    ddpm = resolve_ddpm(args.model, device)
    chw = image_shape(ddpm)
    run = dict(steps=args.steps, sampler=args.sampler, eta=args.eta, seed=args.seed, device=device,
               progress=not args.quiet)
    if args.kind in ("progressive", "shared"):
        if args.kind == "progressive":
            result = edits.progressive(ddpm, args.n, every=args.every, **run)
            grid, nrow = result.frames.transpose(0, 1).reshape(-1, *chw), len(result.timesteps)
        else:
            result = edits.from_shared_latent(ddpm, tuple(args.t or (250, 500, 750, 1000)), args.samples, **run)
            rows = torch.cat([result.latents.unsqueeze(1), result.samples], dim=1)  # latent, then completions
            grid, nrow = rows.reshape(-1, *chw), args.samples + 1
    else:
        x = read_images(args.input, chw).to(device)
        if args.kind == "reconstruct":
            outs = [edits.reconstruct(ddpm, x, t, **run) for t in (args.t or [100, 250, 500, 750])]
            grid, nrow = torch.cat([x.cpu()] + [o.cpu() for o in outs]), len(x)
        elif args.kind == "interpolate":
            if not args.input_b:
                raise ValueError("input-b: interpolate needs --input-b, the second image of each pair")
            x_b = read_images(args.input_b, chw).to(device)
            t = (args.t or [500])[0]
            out = edits.interpolate(ddpm, x, x_b, t, args.lambdas, mode=args.mode or "linear", **run)
            grid = torch.cat([x.unsqueeze(1), out, x_b.unsqueeze(1)], dim=1).reshape(-1, *chw)
            nrow = len(args.lambdas) + 2
        elif args.kind == "denoise":
            y = x
            if args.add_noise is not None:
                if args.add_noise <= 0:
                    raise ValueError(f"add-noise: expected a positive std, got {args.add_noise}")
                y = x + args.add_noise * torch.randn(x.shape, generator=torch.Generator().manual_seed(args.seed))
            result = edits.denoise(ddpm, y, args.sigma, mode=args.mode or "ancestral", **run)
            print(f"sigma {'estimated' if result.estimated else 'given'}: "
                  + ", ".join(f"{s:.3f}" for s in result.sigma.tolist()))
            grid, nrow = torch.cat([x.cpu(), y.cpu(), result.x.cpu()]), len(x)
        else:
            known = edits.load_mask(args.mask, x) if args.mask else _region_mask(args.region, *chw[1:])
            masked = torch.where(known.to(x.device).bool(), x, torch.zeros_like(x))  # unknown shown gray
            out = edits.inpaint(ddpm, x, known, resample=args.resample, jump=args.jump, **run)
            grid, nrow = torch.cat([x.cpu(), masked.cpu(), out.cpu()]), len(x)
    save_grid(grid, args.out, nrow=nrow, scale=args.scale)
    print(f"wrote {args.kind} to {args.out} in {time.monotonic() - start:.1f} s")
    return 0
