"""`xapi-storage blkback connect DOMAIN --path FILE`: serve a disk to a running domain.

Like mirage's xen-disk: writes the frontend and backend XenStore nodes (one transaction,
libxl's permissions, the first free xvd number, backend kind `pyvbd` so the kernel's blkback
never grabs it), serves until Ctrl-C / SIGTERM or a toolstack unplug (online=0, state=5),
then closes cleanly and removes every node it wrote. A second Ctrl-C stops at once.
Every other signal whose default action would kill it (SIGHUP when the terminal or ssh
session goes, SIGQUIT, SIGUSR1/2, SIGALRM, ...) is a stop request too, handled the same way,
and its messages never fail it once the terminal is gone (see docs/blkback.md).
"""

import argparse
import json
import logging
import os
import re
import signal
import sys
import time

HELP = "userspace Xen block backend: serve a file or device to a domain"

# Signals whose default action ends the process: each is a request to unplug and stop (the
# first), or to stop at once (the next), never a death that leaves the nodes in XenStore.
# Those that report a fault of the process itself (SIGSEGV, SIGBUS, SIGABRT, ...) are not
# requests and are left alone, as are SIGKILL and SIGSTOP, which cannot be caught; so is
# SIGXFSZ, which Python ignores (a write past the file size limit then fails with EFBIG, an
# I/O error for that one request, not a reason to unplug).
STOP_SIGNALS = tuple(getattr(signal, name) for name in (
    "SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGALRM", "SIGVTALRM",
    "SIGPROF", "SIGXCPU", "SIGPWR", "SIGIO") if hasattr(signal, name))

# a backend kind is one XenStore path element, and must not be one the kernel's blkback grabs
_KIND = re.compile(r"[A-Za-z0-9_-]{1,64}\Z")


def _say(*args, **kwargs):
    """print to stderr; a stderr that is gone (terminal hung up: EIO; reader gone: EPIPE)
    must not stop the service nor its clean-up midway."""
    kwargs.setdefault("file", sys.stderr)
    try:
        print(*args, **kwargs)
    except (OSError, ValueError):
        pass


def add_arguments(parser):
    sub = parser.add_subparsers(dest="blkback_command", metavar="ACTION")
    p = sub.add_parser("connect", help="plug a disk into a running domain and serve it",
                       description="Plug a virtual disk into DOMAIN and serve it from --path "
                       "until Ctrl-C, SIGTERM or a toolstack unplug; then remove every "
                       "XenStore node written.")
    p.add_argument("domain", help="domain name or numeric id")
    p.add_argument("--path", help="the image file or block device (for --backend null: "
                   "optional, only its size is used)")
    p.add_argument("--backend", choices=("raw", "cow", "null", "block"), default="raw",
                   help="raw: a regular file; block: a block device; null: no I/O at all; "
                   "cow: copy-on-write over the gold image --path, writes thrown away on "
                   "exit (default: raw)")
    p.add_argument("--readonly", action="store_true", help="export the disk read-only")
    p.add_argument("--size", type=int, help="size in bytes, a positive multiple of 512 "
                   "(null backend without --path)")
    p.add_argument("--xen", default=None,
                   help='which Xen: "real" or "sim:DIR" (default: $XAPI_STORAGE_XEN or real)')
    p.add_argument("--kind", default="pyvbd",
                   help="backend kind in XenStore: letters, digits, - and _ (default pyvbd; "
                   "never vbd, which the kernel's blkback would grab)")
    p.add_argument("--max-queues", type=int, default=4,
                   help="most rings (queues) a frontend may use, 1..64 (default 4)")
    p.add_argument("--max-ring-page-order", type=int, default=4, choices=range(0, 5),
                   help="most pages per ring as a power of 2 (default 4: 16 pages)")
    p.add_argument("--max-indirect-segments", type=int, default=256,
                   help="advertised indirect segments (0 disables indirect)")
    p.add_argument("--io-threads", type=int, default=2,
                   help="threads for large reads/writes (>= 256 KiB) of raw and block "
                   "backends; 0: everything in the service thread (default 2)")
    p.add_argument("--no-persistent", action="store_true",
                   help="do not offer persistent grants")
    p.add_argument("--raw-read", choices=("preadv", "mmap"), default="preadv",
                   help="raw: how reads of 64 KiB and more are done; mmap copies from a "
                   "mapping of the file (faster; the process dies of SIGBUS if someone else "
                   "truncates the file while it runs) (default preadv)")
    p.add_argument("--overlay-dir", help="cow: where the (unlinked) overlay file lives")
    p.add_argument("--stats", metavar="FILE",
                   help="write the device's statistics here as JSON, once a second")
    p.add_argument("--quiet", action="store_true", help="no status line")
    p.add_argument("-v", "--verbose", action="store_true", help="log the handshake")


def _human(n):
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def _status(dev, label):
    s = dev.stats_dict()
    r = s["requests"]
    b = s["bytes"]
    line = (f"{label} [{s['state']}] reads {r['read']} ({_human(b['read'])}) "
            f"writes {r['write']} ({_human(b['write'])}) flushes {r['flush'] + r['barrier']} "
            f"discards {r['discard']} errors {s['errors']} "
            f"ring max {s['ring_occupancy']['max']} lat {s['latency_us']['mean']} us")
    return line


def run(args):
    if args.blkback_command != "connect":
        print("usage: xapi-storage blkback connect DOMAIN --path FILE [--backend ...]",
              file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(message)s")
    if args.kind == "vbd":
        print("error: --kind vbd would be grabbed by the kernel's blkback", file=sys.stderr)
        return 2
    if not _KIND.match(args.kind):
        print(f"error: --kind {args.kind!r}: one XenStore path element of 1..64 letters, "
              "digits, - and _", file=sys.stderr)
        return 2
    if args.size is not None and (args.size <= 0 or args.size % 512):
        print(f"error: --size {args.size}: a positive multiple of 512 bytes", file=sys.stderr)
        return 2
    if not 1 <= args.max_queues <= 64:
        print("error: --max-queues must be 1..64", file=sys.stderr)
        return 2
    if not 0 <= args.max_indirect_segments <= 4096:
        print("error: --max-indirect-segments must be 0..4096 (8 pages of 512)",
              file=sys.stderr)
        return 2
    if args.io_threads < 0:
        print("error: --io-threads must be 0 or more", file=sys.stderr)
        return 2
    if args.backend != "null" and not args.path:
        print(f"error: --backend {args.backend} needs --path", file=sys.stderr)
        return 2

    # Signals first: once nodes exist, Ctrl-C/SIGTERM must unplug, never kill us midway.
    stop = {"count": 0, "server": None}

    def on_signal(signum, frame):
        stop["count"] += 1
        if stop["server"] is not None:
            stop["server"].stop(force=stop["count"] > 1)
    for signum in STOP_SIGNALS:
        signal.signal(signum, on_signal)

    from ..xen import open_xen
    from . import fence, toolstack
    from .backends import open_storage
    from .server import Server, XenStore

    try:
        xen = open_xen(args.xen)
    except (OSError, ValueError) as e:
        _say(f"error: cannot open Xen: {e}")
        return 1
    try:
        storage = open_storage(args.backend, args.path, readonly=args.readonly,
                               size=args.size, overlay_dir=args.overlay_dir,
                               read_mode=args.raw_read)
    except (OSError, ValueError) as e:
        _say(f"error: cannot open the storage: {e}")
        return 1
    server = None
    try:
        server = Server(xen)
        xs = XenStore(xen.xenstore_path)
    except Exception as e:      # noqa: BLE001 - OSError, or the XenStore client's own errors
        # (no xenstored: a message, not a traceback)
        storage.close()
        if server is not None:
            server.close()
        _say(f"error: cannot reach Xen (XenStore/event channels/grants): {e}")
        return 1
    fe = be = None
    rc = 0
    try:
        guest = toolstack.resolve_domain(xs, args.domain)
        params = f"{args.backend}:{os.path.abspath(args.path)}" if args.path else args.backend
        devid, name, fe, be, created = toolstack.plug_vbd(
            xs, guest, params, backend_domid=xen.domid, kind=args.kind, readonly=args.readonly)
        dev = server.add_device(be, storage, max_queues=args.max_queues,
                                max_ring_page_order=args.max_ring_page_order,
                                max_indirect=args.max_indirect_segments,
                                persistent=not args.no_persistent, stats_path=args.stats,
                                io_threads=args.io_threads)
        storage = None
        tty = sys.stderr.isatty() and not args.quiet
        label = f"{name} of domain {guest}"
        _say(f"serving {args.backend} {args.path or ''} as {name} (vbd {devid}) to domain "
             f"{guest} at {be}; {_human(dev.limits.sectors * 512)}"
             f"{', read-only' if dev.readonly else ''}; barrier: {fence.KIND}")
        _say("Ctrl-C to unplug (twice to force)")

        stop["server"] = server
        if stop["count"]:
            server.stop(force=stop["count"] > 1)
        last = 0.0
        last_state = None
        while server.devices:
            server.step()
            now = time.monotonic()
            if dev.stats.state != last_state and not tty and not args.quiet:
                _say(f"{name}: {dev.stats.state}")
                last_state = dev.stats.state
            if tty and now - last >= 1.0:
                last = now
                _say("\r\033[K" + _status(dev, label), end="", file=sys.stderr, flush=True)
        if tty:
            _say("\r\033[K" + _status(dev, label))
        if args.stats:
            dev.write_stats()
        final = dev.stats_dict()
        _say(json.dumps({"device": name, "requests": final["requests"],
                         "errors": final["errors"]}))
    except (OSError, ValueError, toolstack.ToolstackError) as e:
        _say(f"error: {e}")
        rc = 1
    finally:
        if storage is not None:
            storage.close()
        try:
            if fe is not None:
                toolstack.remove_vbd(xs, fe, be, created)
                _say(f"removed {fe} and {be}")
        except OSError as e:
            _say(f"error: removing the XenStore nodes: {e}")
            rc = 1
        xs.close()
        server.close()
    return rc


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    add_arguments(p)
    sys.exit(run(p.parse_args()))
