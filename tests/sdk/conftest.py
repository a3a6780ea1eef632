"""Fixtures of the SDK tests: a root where the real installer has laid the toy plugins'
executables, and a scratch SR directory."""

import pytest

from .helpers import TOY, TOY_PLUGINS, install


@pytest.fixture(scope="session")
def root(tmp_path_factory):
    r = tmp_path_factory.mktemp("root")
    out = install(r, *TOY_PLUGINS)
    assert out.returncode == 0, out.stderr
    return r


@pytest.fixture(scope="session")
def toy_dir(root):
    return root / "volume" / TOY


@pytest.fixture
def sr(tmp_path):
    d = tmp_path / "sr"
    d.mkdir()
    return str(d)
