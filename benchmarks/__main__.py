"""``python -m benchmarks [--quick] [--json FILE]``: the op and U-Net benchmark report."""

from .ops_report import main

main()
