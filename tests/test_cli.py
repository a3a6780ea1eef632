import subprocess
import sys


def test_xapi_storage_help_lists_subcommands():
    out = subprocess.run([sys.executable, "-m", "xapi_storage.cli", "--help"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    for name in ("install", "demo", "blkback"):
        assert name in out.stdout
