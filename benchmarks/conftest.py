"""pytest-benchmark options: ``--quick`` for small sizes (what CI runs)."""

import pytest


def pytest_addoption(parser):
    parser.addoption("--quick", action="store_true", help="small sizes (CI)")


@pytest.fixture(scope="session")
def quick(request):
    return request.config.getoption("--quick")
