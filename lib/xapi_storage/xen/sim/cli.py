"""`xapi-storage simxen`: run and inspect a simulated Xen (docs/simxen.md)."""

import sys

HELP = "run or inspect a simulated Xen (XenStore, grant tables, event channels)"


def add_arguments(parser):
    sub = parser.add_subparsers(dest="simxen_command", metavar="ACTION")
    sub.required = True     # add_subparsers(required=) is 3.7+
    p = sub.add_parser("run", help="serve a simulated Xen in DIR until SIGTERM or Ctrl-C "
                       "(DIR is created if missing; everything made in it is removed on exit)")
    p.add_argument("dir", metavar="DIR")
    p = sub.add_parser("create-domain", help="make a guest domain; prints its domid")
    p.add_argument("dir", metavar="DIR")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--mem-mb", type=int, default=1024, help="guest memory in MiB (default 1024, sparse)")
    p = sub.add_parser("destroy-domain", help="destroy a guest domain (by domid or name)")
    p.add_argument("dir", metavar="DIR")
    p.add_argument("domain", metavar="DOMAIN")
    p = sub.add_parser("list-domains", help="list the domains: domid, name")
    p.add_argument("dir", metavar="DIR")
    p = sub.add_parser("ls", help="dump the XenStore tree with values and permissions")
    p.add_argument("dir", metavar="DIR")
    p.add_argument("path", metavar="PATH", nargs="?", default="/")


def _ls(dir_, path):
    from pyxs import Client
    from . import layout
    with Client(unix_socket_path=layout.xenstore_sock(dir_, 0)) as c:
        def walk(p, depth):
            value = c.read(p.encode())
            perms = " ".join(x.decode() for x in c.get_perms(p.encode()))
            name = p if depth == 0 else p.rsplit("/", 1)[1]
            print(f"{'  ' * depth}{name} = {value.decode(errors='replace')!r}  ({perms})")
            for child in c.list(p.encode()):
                walk((p.rstrip("/") + "/" + child.decode()), depth + 1)
        walk(path, 0)


def run(args):
    from .. import XenError
    from . import Sim
    cmd = args.simxen_command
    if cmd == "run":
        from .daemon import run as run_daemon
        return run_daemon(args.dir)
    try:
        sim = Sim(args.dir)
        if cmd == "create-domain":
            print(sim.create_domain(args.name, mem_mb=args.mem_mb))
        elif cmd == "destroy-domain":
            target = args.domain
            if not target.isdigit():
                match = [d["domid"] for d in sim.domains() if d["name"] == target]
                if not match:
                    print(f"simxen: no domain named {target!r}", file=sys.stderr)
                    return 1
                target = match[0]
            sim.destroy_domain(int(target))
        elif cmd == "list-domains":
            for d in sim.domains():
                print(f"{d['domid']}\t{d['name']}")
        elif cmd == "ls":
            _ls(sim.dir, args.path)
    except XenError as e:
        print(f"simxen: {e.strerror or e}", file=sys.stderr)
        return 1
    return 0
