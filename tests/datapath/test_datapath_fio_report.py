"""benchmarks/datapath_fio.py's own logic, here: reading fio's JSON output, the ratios against
their targets, the table. (The benchmark itself boots the real-Xen test bed and takes about
15 minutes: too long for CI; its measured table is in docs/blkback.md.)"""

import importlib.util
import json
import os

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
PATH = os.path.join(HERE, "..", "..", "benchmarks", "datapath_fio.py")


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("datapath_fio", PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def fio_json(read_bw=0, read_iops=0.0, write_bw=0, write_iops=0.0, error=0):
    """The shape of fio 3.33's --output-format=json (the fields the benchmark reads, and some
    around them)."""
    side = lambda bw, iops: {"io_bytes": bw * 20, "io_kbytes": bw * 20 // 1024,  # noqa: E731
                             "bw_bytes": bw, "bw": bw // 1024, "iops": iops, "runtime": 20001,
                             "total_ios": int(iops * 20), "short_ios": 0, "drop_ios": 0}
    return json.dumps({
        "fio version": "fio-3.33", "timestamp": 1764608000, "time": "Tue Dec  1 17:00:00 2026",
        "global options": {},
        "jobs": [{"jobname": "bench", "groupid": 0, "error": error, "eta": 0, "elapsed": 23,
                  "job options": {"name": "bench", "rw": "read", "bs": "1m"},
                  "read": side(read_bw, read_iops), "write": side(write_bw, write_iops),
                  "trim": side(0, 0.0), "sync": {"total_ios": 0}}],
        "disk_util": [{"name": "xvda", "read_ios": 100, "write_ios": 0, "util": 99.1}]},
        indent=2)


def test_parse_fio_takes_the_direction_of_the_workload(bench):
    text = fio_json(read_bw=52428800, read_iops=50.0, write_bw=1000, write_iops=0.2)
    assert bench.parse_fio(text, "read") == (52428800.0, 50.0)
    assert bench.parse_fio(text, "randread") == (52428800.0, 50.0)
    assert bench.parse_fio(text, "write") == (1000.0, 0.2)


def test_parse_fio_skips_fio_warnings_before_the_json(bench):
    text = ("fio: this platform does not support process shared mutexes, forcing use of "
            "threads. Use the 'thread' option to get rid of this warning.\n" +
            fio_json(read_bw=4096000, read_iops=1000.0))
    assert bench.parse_fio(text, "randread") == (4096000.0, 1000.0)


@pytest.mark.parametrize("text, why", [
    ("fio: pid=12, err=5/file:io_u.c:1889, func=io_u error, error=Input/output error", "no JSON"),
    (fio_json(read_bw=100, read_iops=1.0, error=5), "error 5"),
    (fio_json(), "no data"),
    (json.dumps({"jobs": []}), "one fio job"),
])
def test_parse_fio_refuses_a_run_that_measured_nothing(bench, text, why):
    with pytest.raises(ValueError, match=why):
        bench.parse_fio(text, "read")


def results(bench, py, kernel, qdisk):
    """results[backend][workload] with IOPS scaled per backend (bytes/s follow the IOPS)."""
    out = {}
    for b, f in (("pyblkback", py), ("blkback", kernel), ("qdisk", qdisk)):
        out[b] = {}
        for name, _, bs, _, _ in bench.WORKLOADS:
            size = 1 << 20 if bs == "1m" else 4096
            out[b][name] = (f * 100 * size, f * 100)
    return out


def test_rows_give_the_ratios_and_the_targets_per_workload(bench):
    # pyblkback at 0.7x the kernel's blkback and 1.5x qdisk: under 0.8x at 1 MiB, over 0.5x
    # at 4 KiB, over 1.2x qdisk everywhere
    report = bench.rows(results(bench, py=0.7, kernel=1.0, qdisk=0.7 / 1.5))
    assert [r["workload"] for r in report] == ["read 1 MiB", "write 1 MiB", "randread 4 KiB"]
    by = {r["workload"]: r for r in report}
    assert by["read 1 MiB"]["vs_blkback"] == 0.7 and by["read 1 MiB"]["target_blkback"] == 0.8
    assert by["read 1 MiB"]["met_blkback"] is False
    assert by["randread 4 KiB"]["target_blkback"] == 0.5
    assert by["randread 4 KiB"]["met_blkback"] is True
    assert all(r["vs_qdisk"] == 1.5 and r["met_qdisk"] is True for r in report)
    assert by["read 1 MiB"]["pyblkback_mbps"] == round(0.7 * 100 * (1 << 20) / 1e6, 1)
    assert by["randread 4 KiB"]["blkback_iops"] == 100
    assert by["randread 4 KiB"]["iodepth"] == 32
    assert all(r["emulation"] == "tcg" for r in report)
    json.dumps(report)                                    # --json prints each row as is


def test_a_ratio_just_under_the_qdisk_target_is_not_met(bench):
    report = bench.rows(results(bench, py=1.19, kernel=1.0, qdisk=1.0))
    assert all(r["met_qdisk"] is False and r["met_blkback"] is True for r in report)


def test_the_table_shows_every_backend_the_ratios_and_says_tcg(bench):
    text = bench.table(bench.rows(results(bench, py=0.7, kernel=1.0, qdisk=0.5)))
    lines = text.splitlines()
    assert len(lines) == 5                                # head, three rows, the note
    for b in ("blkback MB/s", "pyblkback MB/s", "qdisk MB/s", "pyb/blkback", "pyb/qdisk"):
        assert b in lines[0]
    assert "0.70x" in lines[1] and "NO" in lines[1] and "1.40x" in lines[1]
    assert "indicative only" in lines[-1] and "TCG" in lines[-1]


def test_the_fio_command_is_direct_libaio_time_based(bench):
    cmd = bench.fio_command("xvdb", "randread", "4k", 32, 20)
    for part in ("--filename=/dev/xvdb", "--rw=randread", "--bs=4k", "--iodepth=32",
                 "--ioengine=libaio", "--direct=1", "--time_based", "--runtime=20",
                 "--output-format=json"):
        assert part in cmd.split()


@pytest.mark.parametrize("args", [["--runtime", "0"], ["--size", "0"], ["--runtime", "-5"]])
def test_bad_options_are_refused_before_the_bed_is_touched(bench, args, monkeypatch, capsys):
    """fio's --runtime=0 means no limit and dd of 0 MiB makes an empty file: refused with a
    usage error (exit 2) before anything of the test bed is looked at."""
    from xapi_storage import testbed

    def reached(*a, **k):
        raise AssertionError("the benchmark went on to the test bed")
    monkeypatch.setattr(testbed, "cache_root", reached)
    monkeypatch.setattr(testbed, "unavailable_reason", reached)
    monkeypatch.setattr("sys.argv", ["datapath_fio.py"] + args)
    with pytest.raises(SystemExit) as e:
        bench.main()
    assert e.value.code == 2
    assert "at least 1" in capsys.readouterr().err

