"""`xapi-storage attach URI --vm VM` and `xapi-storage detach URI --vm VM`: plug a volume into a
running guest (and unplug it) the way XenServer's toolstack does, without the toolstack.

attach: the datapath plugin of the URI's scheme (installed under --root) is run through its
executables exactly as the daemon runs them - Datapath.attach(uri, domid), then
Datapath.activate (or activate_readonly) - and its result is plugged into the guest as xenopsd
plugs it (XenStore nodes in one transaction, the udev `block` script's work, a bounded wait for
hotplug-status). The guest's device name is printed on stdout. Any failure undoes what was done
(unplug, deactivate, detach) and exits 1 with the error record's code and params.

detach: the plug of that URI in that guest is found again (the toolstack records the URI in the
VBD's private XenStore directory), unplugged cleanly (the guest is asked to let go, and must,
within --timeout) or, with --force, hard (as at VM shutdown); then Datapath.deactivate and
Datapath.detach, which never fail. Without a plug left, detach still runs deactivate and
detach (it cleans up after an interrupted attach).
"""

import os
import sys

HELP = "plug a volume into a running guest through its datapath plugin, as xenopsd does"
DETACH_HELP = "unplug a volume plugged by `xapi-storage attach` and release it"
DEFAULT_ROOT = "/usr/libexec/xapi-storage-script"
URI_KEY = "xapi-storage-uri"


def _common(p):
    p.add_argument("uri", help="the volume's URI, e.g. blkback:///srv/sr/<key>.img (its scheme "
                   "names the datapath plugin)")
    p.add_argument("--vm", required=True, metavar="NAME|DOMID",
                   help="the running guest: its domain name or numeric domain id")
    p.add_argument("--root", default=DEFAULT_ROOT,
                   help=f"where the plugins are installed (default {DEFAULT_ROOT})")
    p.add_argument("--xen", default=None,
                   help='which Xen: "real" or "sim:DIR" (default: $XAPI_STORAGE_XEN or real)')
    p.add_argument("--timeout", type=float, default=60.0,
                   help="seconds to wait for each plugin call, for hotplug-status, and for the "
                   "guest to let go at detach (default 60)")


def add_arguments(parser):
    _common(parser)
    parser.add_argument("--readonly", action="store_true",
                        help="a read-only disk: Datapath.activate_readonly and mode=r")


def add_detach_arguments(parser):
    _common(parser)
    parser.add_argument("--force", action="store_true",
                        help="hard unplug (as at VM shutdown): do not wait for the guest")


class Failed(Exception):
    """An operator-facing failure: code and params, as an error record has them."""

    def __init__(self, code, params):
        super().__init__(code, params)
        self.code, self.params = code, [str(p) for p in params]


def _fail(e):
    from ..sdk import jsonio
    code = getattr(e, "code", None)
    params = getattr(e, "params", None)
    if not isinstance(code, str) or not isinstance(params, list):
        code, params = "SR_BACKEND_FAILURE", [type(e).__name__, str(e)]
    print(f"error: {code} {jsonio.dumps(params)}", file=sys.stderr)
    return 1


def _setup(args):
    from ..blkback import toolstack as names
    from ..xen import open_xen
    from . import xenopsd
    from .daemon import Daemon, uri_scheme
    scheme = uri_scheme(args.uri)
    if scheme is None:
        raise Failed("SR_BACKEND_FAILURE", ["Invalid_uri", args.uri, "the URI has no scheme"])
    daemon = Daemon(args.root, timeout=args.timeout)
    if scheme not in daemon.datapaths:
        raise Failed("MISSING_URI", [args.uri, f"no datapath plugin {scheme!r} registered under "
                                     f"{os.path.join(args.root, 'datapath')} (installed: "
                                     f"{', '.join(sorted(daemon.datapaths)) or 'none'}; "
                                     "`xapi-storage install --root` lays them out)"])
    try:
        xs = xenopsd.open_xenstore(open_xen(args.xen).xenstore_path)
    except (OSError, ValueError) as e:
        raise Failed("SR_BACKEND_FAILURE", ["Xen_unavailable", str(e)]) from None
    try:
        guest = names.resolve_domain(xs, args.vm)
    except names.ToolstackError as e:
        xs.close()
        raise Failed("SR_BACKEND_FAILURE", ["No_such_vm", args.vm, str(e)]) from None
    if guest == 0:
        xs.close()
        raise Failed("SR_BACKEND_FAILURE", ["Invalid_vm", args.vm, "a guest, not dom0"])
    return daemon, scheme, xs, guest


def _release(daemon, scheme, uri, domain):
    """deactivate + detach; never raises (detach never fails; what it reports is printed)."""
    for name in ("Datapath.deactivate", "Datapath.detach"):
        try:
            daemon.datapath(scheme, name, {"dbg": "xapi-storage detach", "uri": uri,
                                           "domain": domain})
        except Exception as e:  # noqa: BLE001 - say it, go on
            print(f"warning: {name}: {e}", file=sys.stderr)


def run(args):
    from . import xenopsd
    try:
        daemon, scheme, xs, guest = _setup(args)
    except Exception as e:  # noqa: BLE001
        return _fail(e)
    domain = str(guest)
    dbg = "xapi-storage attach"
    try:
        try:
            result = daemon.datapath(scheme, "Datapath.attach",
                                     {"dbg": dbg, "uri": args.uri, "domain": domain})
            daemon.datapath(scheme, "Datapath.activate_readonly" if args.readonly
                            else "Datapath.activate",
                            {"dbg": dbg, "uri": args.uri, "domain": domain})
            vbd = xenopsd.plug(xs, guest, result, readonly=args.readonly,
                               timeout=args.timeout, private={URI_KEY: args.uri})
        except BaseException:
            _release(daemon, scheme, args.uri, domain)
            raise
    except Exception as e:  # noqa: BLE001
        return _fail(e)
    finally:
        xs.close()
    print(f"plugged {args.uri} into domain {guest} as {vbd.name} (vbd {vbd.devid}, "
          f"{vbd.be}){', read-only' if args.readonly else ''}", file=sys.stderr)
    print(vbd.name)
    return 0


def run_detach(args):
    from . import xenopsd
    try:
        daemon, scheme, xs, guest = _setup(args)
    except Exception as e:  # noqa: BLE001
        return _fail(e)
    try:
        vbds = [v for v in xenopsd.find_vbds(xs, guest)
                if xs.read(f"{v.private}/{URI_KEY}") == args.uri]
        for vbd in vbds:
            if args.force:
                xenopsd.hard_unplug(xs, vbd, timeout=args.timeout)
            else:
                try:
                    xenopsd.clean_unplug(xs, vbd, timeout=args.timeout)
                except xenopsd.DeviceError as e:
                    raise Failed("SR_BACKEND_FAILURE_46", [
                        "Device_in_use", args.uri,
                        f"{e}; the disk stays plugged: unmount it in the guest and retry, "
                        "or use --force"]) from None
            print(f"unplugged {vbd.name} (vbd {vbd.devid}) from domain {guest}", file=sys.stderr)
        if not vbds:
            print(f"no plug of {args.uri} in domain {guest}; releasing it in the datapath",
                  file=sys.stderr)
    except Exception as e:  # noqa: BLE001
        return _fail(e)
    finally:
        xs.close()
    _release(daemon, scheme, args.uri, str(guest))
    return 0
