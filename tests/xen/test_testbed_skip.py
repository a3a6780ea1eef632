"""Where QEMU cannot run, the bed's tests skip with the reason, except in CI, where they fail."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


@pytest.mark.parametrize("ci, expect_rc, expect", [
    ("", 0, "SKIPPED"),
    ("true", 1, "the real-Xen test bed cannot run in CI: qemu-system-x86_64 is not installed"),
])
def test_no_qemu_skips_here_but_fails_in_ci(tmp_path, ci, expect_rc, expect):
    env = dict(os.environ, PATH=str(tmp_path), CI=ci)  # no qemu-system-x86_64 on this PATH
    p = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
         str(HERE / "test_xen_smoke.py") + "::test_xl_info_shows_the_hypervisor"],
        env=env, cwd=str(HERE.parents[1]), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        universal_newlines=True, timeout=120)
    assert p.returncode == expect_rc, p.stdout
    assert expect in p.stdout
    assert "qemu-system-x86_64 is not installed" in p.stdout
