"""The runner's API against the booted bed: files in and out, background processes, time limits."""

import hashlib
import os
import time

import pytest

from xapi_storage import testbed

pytestmark = pytest.mark.xen


def test_put_get_write_file_round_trip(bed, tmp_path):
    data = os.urandom(1 << 20)
    (tmp_path / "in.bin").write_bytes(data)
    bed.put(tmp_path / "in.bin", "/root/api/in.bin", mode=0o600)
    rc, out, _ = bed.dom0("stat -c %a /root/api/in.bin; md5sum < /root/api/in.bin", timeout=30)
    assert out.split() == ["600", hashlib.md5(data).hexdigest(), "-"]
    bed.get("/root/api/in.bin", tmp_path / "out.bin")
    assert (tmp_path / "out.bin").read_bytes() == data
    bed.write_file("/root/api/hello.txt", "hello\n")
    assert bed.dom0(["cat", "/root/api/hello.txt"]).stdout == "hello\n"
    assert bed.dom0("cat", input=b"from stdin").stdout == "from stdin"


def test_background_process_poll_and_stop(bed):
    quick = bed.spawn("echo quick; exit 3", name="quick")
    deadline = time.monotonic() + 30
    while quick.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert quick.poll() == 3
    assert quick.stop().stdout == "quick\n"

    server = bed.spawn(["sh", "-c", "echo started; exec sleep 1000"], name="server")
    time.sleep(1)
    assert server.poll() is None
    rc, out, _ = server.stop()
    assert rc == -15 and out == "started\n"
    assert bed.dom0("kill -0 %d" % server.pid).rc != 0, "stopped process still alive"


def test_dom0_timeout_kills_the_command(bed):
    with pytest.raises(testbed.CommandTimeout) as exc:
        bed.dom0("echo before; exec sleep 31.25", timeout=2)
    assert exc.value.result.stdout == "before\n"
    assert bed.dom0(["pgrep", "-f", "sleep 31.25"]).rc == 1, "timed-out command survived"


def test_check_raises_with_the_output(bed):
    with pytest.raises(testbed.CommandFailed) as exc:
        bed.dom0("echo oops >&2; exit 7", check=True)
    assert exc.value.result == (7, "", "oops\n")


def test_guest_command_output_status_and_timeout(bed, guest):
    rc, out, err = bed.guest(guest.name, "echo out; echo err >&2; exit 5", timeout=30)
    assert (rc, out, err) == (5, "out\n", "err\n")
    blob = bed.guest(guest.name, "head -c 30000 /dev/zero | tr '\\0' x", timeout=60).stdout
    assert blob == "x" * 30000
    with pytest.raises(testbed.CommandTimeout):
        bed.guest(guest.name, "sleep 30", timeout=2)
    assert bed.guest(guest.name, "echo still here", timeout=30).stdout == "still here\n"
