"""`xapi-storage testbed`: build the real-Xen test bed's images, boot it, get a shell, run a command.

    xapi-storage testbed build [--rebuild]       build or reuse the cached images; print their path
    xapi-storage testbed boot                    boot, print timings and `xl info`, power off
    xapi-storage testbed shell [dom0|guest]      boot and read commands from stdin, one a line
    xapi-storage testbed run [--guest] -- CMD    boot, run CMD in dom0 (or a guest), exit with its rc
"""

import argparse
import shlex
import sys
import time
from pathlib import Path

HELP = "the real-Xen test bed under QEMU: build its images, boot it, shell, run a command"


def add_arguments(parser):
    sub = parser.add_subparsers(dest="tb_command", metavar="ACTION")
    b = sub.add_parser("build", help="build (or reuse) the cached images and print their path")
    b.add_argument("--rebuild", action="store_true", help="rebuild even if the cache is valid")

    def common(p):
        p.add_argument("--checkout", default=_default_checkout(),
                       help="directory shared read-only into dom0 at /mnt/checkout "
                            "(default: this checkout, %(default)s)")
        p.add_argument("--no-install", action="store_true",
                       help="do not pip-install the checkout into dom0's venv")
        p.add_argument("--run-dir", help="where logs go (default: build/testbed-runs/<time>)")
        p.add_argument("--keep-logs", action="store_true",
                       help="collect dom0's logs into the run dir at the end, even on success")
        p.add_argument("--boot-timeout", type=int, default=300, help="seconds (default 300)")

    bt = sub.add_parser("boot", help="boot, print timings and `xl info`, power off")
    common(bt)
    sh = sub.add_parser("shell", help="boot; run each line of stdin in dom0 or in a guest")
    common(sh)
    sh.add_argument("where", nargs="?", choices=("dom0", "guest"), default="dom0")
    r = sub.add_parser("run", help="boot, run a command in dom0 (or a guest), exit with its rc")
    common(r)
    r.add_argument("--guest", action="store_true", help="run it in a fresh PV guest instead")
    r.add_argument("--timeout", type=int, default=600, help="seconds for CMD (default 600)")
    r.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD ARGS...")


def _default_checkout():
    here = Path(__file__).resolve()
    for parent in here.parents:
        if (parent / "setup.cfg").exists() and (parent / "lib" / "xapi_storage").is_dir():
            return str(parent)
    return None


def _say(msg):
    print("testbed: %s" % msg, file=sys.stderr, flush=True)


def run(args):
    from . import BuildError, TestBed, TestBedError, ensure_images, unavailable_reason
    if args.tb_command is None:
        _say("say what to do: build, boot, shell or run (see --help)")
        return 2
    try:
        t0 = time.monotonic()
        images = ensure_images(rebuild=getattr(args, "rebuild", False))
        if args.tb_command == "build":
            print(images.dir)
            _say("images ready in %.0fs" % (time.monotonic() - t0))
            return 0
        reason = unavailable_reason(images_cached=True)
        if reason:
            _say("cannot run the test bed: %s" % reason)
            return 1
        with TestBed(images, checkout=args.checkout, run_dir=args.run_dir,
                     boot_timeout=args.boot_timeout) as bed:
            _say("booting (logs in %s)" % bed.run_dir)
            failed = True
            try:
                bed.boot()
                _say("dom0 ready after %.1fs" % bed.timings["boot"])
                if args.checkout and not args.no_install:
                    bed.install_checkout()
                    _say("checkout installed in dom0:/opt/xapi-storage/venv in %.1fs" %
                         bed.timings["install"])
                rc = _ACTIONS[args.tb_command](bed, args)
                failed = rc != 0
                return rc
            finally:
                if failed or args.keep_logs:
                    bed.collect_logs()
                    _say("logs in %s" % bed.run_dir)
    except (BuildError, TestBedError) as e:
        _say(str(e))
        return 1
    except KeyboardInterrupt:
        return 130


def _boot(bed, args):
    res = bed.dom0("xl info", timeout=60)
    sys.stdout.write(res.stdout)
    _say("timings: %s" % bed.timings)
    return res.rc


def _emit(res):
    sys.stdout.write(res.stdout)
    sys.stderr.write(res.stderr)
    sys.stdout.flush()


def _shell(bed, args):
    from . import CommandTimeout
    where = "dom0"
    if args.where == "guest":
        bed.start_guest("shell")
        where = "guest shell"
    interactive = sys.stdin.isatty()
    _say("%s ready: one command a line (each runs in a fresh sh -c, so `cd` does not stick); "
         "end with Ctrl-D" % where)
    rc = 0
    while True:
        if interactive:
            sys.stdout.write("%s# " % where.split()[0])
            sys.stdout.flush()
        line = sys.stdin.readline()
        if not line:
            return rc
        if not line.strip():
            continue
        try:
            if args.where == "guest":
                res = bed.guest("shell", line, timeout=300)
            else:
                res = bed.dom0(line, timeout=600)
        except CommandTimeout as e:
            _say(str(e))
            rc = 124
            continue
        _emit(res)
        rc = res.rc
        if rc and interactive:
            _say("rc %s" % rc)


def _run(bed, args):
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        _say("run: give a command after --")
        return 2
    if args.guest:
        bed.start_guest("run")
        res = bed.guest("run", " ".join(shlex.quote(c) for c in cmd), timeout=args.timeout)
    else:
        res = bed.dom0(cmd, timeout=args.timeout, cwd=None)
    _emit(res)
    return res.rc


_ACTIONS = {"boot": _boot, "shell": _shell, "run": _run}
