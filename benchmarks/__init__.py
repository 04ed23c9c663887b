"""The fastddpm benchmark suite: every fast path timed against the pure-PyTorch reference (or
diffusers) in the same run, checked before it is timed.

This folder is the suite's one home. It is installed with the package as ``fastddpm.bench``, so
``fastddpm bench`` works after ``pip install .``; from a checkout, ``python -m benchmarks`` runs the
same report and ``pytest --import-mode=importlib benchmarks`` its pytest-benchmark cases.

    harness.py        timing: interleaved medians, CUDA events, copy bandwidth
    models.py         benchmark models: presets with every weight random
    ops.py            section "ops": the fused ops, Winograd convs, the U-Net forward
    train.py          section "train": one Algorithm-1 step
    sampler.py        section "sampler": the full sampler, per step and per call
    diffusers_cmp.py  section "diffusers": DDPMPipeline on the same weights and noise
    report.py         `fastddpm bench`: runs sections, writes JSON, markdown and a plot
    gpu_check.sh      the one prepared script for a machine with a GPU
"""
