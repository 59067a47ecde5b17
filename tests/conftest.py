"""Shared fixtures: paths of the repository and its bundled model and golden set."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# Tests import helpers such as tests/servers.py as `servers`.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from testpaths import REPO, TEST_DATA  # noqa: E402,F401 - re-exported for fixtures below

# Under xdist (the README's command runs 3 workers on CI's 2 cores) every worker is already one
# busy process per core: torch's and OpenMP's intra-op threads in each would only contend, and
# their spin-waits burn the CPU the other workers need (-20% CPU time on tests/export and
# tests/foundation). One thread per worker, and per process it starts unless that process is
# given its own count; set here, before any test module imports torch. A single-process run
# (-n 0) keeps the default of 2 below.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

try:
    from hypothesis import settings as _hyp_settings
except ImportError:   # the property tests skip themselves without the test extra
    pass
else:
    # The README's test command (and CI) draws the same examples on every run, derived from each
    # test's name: a run cannot go red on an example nobody has seen, and a failure reproduces.
    # HYPOTHESIS_PROFILE=explore draws new examples each run: how new failing inputs are found.
    _hyp_settings.register_profile("ci", derandomize=True, database=None)
    _hyp_settings.register_profile("explore", derandomize=False)
    _hyp_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def registry():
    from sentinel.registry import Registry

    return Registry(REPO / "models", default_model="digits")


@pytest.fixture(scope="session")
def digits_v3(registry):
    return registry.resolve("digits:v3")


@pytest.fixture(scope="session")
def digits_golden(digits_v3):
    from sentinel.golden import golden_for

    return golden_for(digits_v3, REPO / "golden_sets")


@pytest.fixture(autouse=True, scope="session")
def _threads():
    """Keep torch to the 2 cores CI has, and make subprocesses find the package."""
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    yield


# Proxy tests treat ResourceWarning (an unclosed socket, file or transport) as an error. The
# project-wide filter ignores it (torch, kserve and subprocess pipes raise them elsewhere); in
# tests/proxy a leak is a bug, since the proxy holds sockets for a living. (Here, not in a
# tests/proxy/conftest.py: a second conftest module would shadow this one for `from conftest import`.)
_PROXY_TESTS = Path(__file__).resolve().parent / "proxy"


def pytest_collection_modifyitems(items):
    for item in items:
        if _PROXY_TESTS in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.filterwarnings("error::ResourceWarning"))


@pytest.fixture(autouse=True)
def _collect_proxy_leaks(request):
    """A garbage collection after each proxy test, so a leaked object warns inside the test that leaked it.

    And one before it, under the project-wide filter (ResourceWarning ignored): an object an
    earlier test outside tests/proxy left unclosed (on the same xdist worker) was otherwise
    collected during a proxy test and failed it as that test's leak (seen under heavy load).
    """
    proxy = _PROXY_TESTS in Path(str(request.node.fspath)).resolve().parents
    if proxy:
        import gc
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            gc.collect()
    yield
    if proxy:
        import gc

        gc.collect()
