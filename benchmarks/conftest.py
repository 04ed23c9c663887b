"""pytest-benchmark options: ``--quick`` for small sizes (what CI runs), ``--long`` for 1000-step jobs."""

import pytest


def pytest_addoption(parser):
    parser.addoption("--quick", action="store_true", help="small sizes (CI)")
    parser.addoption("--long", action="store_true", help="also the 1000-step sampler jobs (cifar10: ~40 min on 2 cores)")


def pytest_generate_tests(metafunc):
    """Sampler jobs (preset, steps): --quick: mnist 10; default: mnist and cifar10 at 100 steps;
    --long: also 1000 steps."""
    if "sampler_job" in metafunc.fixturenames:
        config = metafunc.config
        if config.getoption("--quick"):
            jobs = [("mnist", 10)]
        else:
            jobs = [("mnist", 100), ("cifar10", 100)]
            if config.getoption("--long"):
                jobs += [("mnist", 1000), ("cifar10", 1000)]
        metafunc.parametrize("sampler_job", jobs, ids=[f"{p}-{s}steps" for p, s in jobs], scope="module")


@pytest.fixture(scope="session")
def quick(request):
    return request.config.getoption("--quick")
