"""fastddpm benchmarks: every fast path timed against the pure-PyTorch reference in the same run."""
