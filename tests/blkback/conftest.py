import pytest


@pytest.fixture(scope="session")
def cref(tmp_path_factory):
    """The C reference of ring.h and blkif.h (x86_64 layout), compiled once per session."""
    from .cref import build
    return build(tmp_path_factory.mktemp("cref"))
