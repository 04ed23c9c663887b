"""``python -m benchmarks``: the same as ``fastddpm bench`` (see report.py)."""

from .report import main

main()
