"""``python -m benchmarks``: the same as ``fastddpm bench`` (see fastddpm/bench/report.py)."""

from fastddpm.bench.report import main

main()
