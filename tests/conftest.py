from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"

# Ray workers inherit this environment: they must import the tests' own scorer classes too.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """../shared beside the checkout (real photos and weights); absent on a user's clone."""
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is absent: tests that need the shared real data/weights are skipped")
    return SHARED


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray on this machine (2 CPUs), shut down afterwards so cluster tests can start their own."""
    import ray

    from pipeline.engine import init_ray

    init_ray(num_cpus=2)
    yield ray
    ray.shutdown()
