"""The ``ranks`` fixture: 2 local gloo ranks shared by every test of
tests/distributed (the pool and the helpers are in ranks.py)."""
import pytest

from ranks import Ranks


@pytest.fixture(scope="session")
def ranks():
    """The 2 ranks every test of tests/distributed runs its jobs on."""
    pool = Ranks()
    yield pool
    pool.close()
