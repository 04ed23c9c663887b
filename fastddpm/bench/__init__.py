"""The benchmark suite behind ``fastddpm bench`` and ``python -m benchmarks``: every fast path
against the pure-PyTorch reference (or diffusers) in the same run, checked before it is timed."""
