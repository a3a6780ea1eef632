import subprocess
import sys


def test_xapi_storage_help_lists_subcommands():
    out = subprocess.run([sys.executable, "-m", "xapi_storage.cli", "--help"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             universal_newlines=True)
    assert out.returncode == 0, out.stderr
    for name in ("install", "demo", "blkback"):
        assert name in out.stdout
