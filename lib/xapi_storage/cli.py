"""The `xapi-storage` command: one entry point, one lazily imported module per subcommand.

Each subcommand module exposes:

    HELP: str                                  one line for `xapi-storage --help`
    def add_arguments(parser): ...             fill an argparse parser
    def run(args) -> int: ...                  do the work, return the exit status

Imports stay lazy so that `xapi-storage install` does not pay for cffi, and so on.
"""

import argparse
import importlib
import sys

# subcommand -> module path (relative to this package). Add a row to add a subcommand.
SUBCOMMANDS = {
    "install": ".installer",          # lay out plugin executables under a root (issue: SDK)
    "conformance": ".conformance.cli",  # check an installed volume plugin as the daemon calls it
    "new-plugin": ".newplugin",       # write a plugin package wired to install and conformance
    "demo": ".demo",                  # the README's main job on a default that needs no Xen
    "blkback": ".blkback.cli",        # userspace blkback ring server (connect, ...)
    "simxen": ".xen.sim.cli",         # the simulated Xen (XenStore, grants, event channels)
    "testbed": ".testbed.cli",        # the real-Xen test bed under QEMU
    "attach": ".toolstack.cli",       # plug a volume into a running guest, as xenopsd does
    "detach": ".toolstack.detach_cli",  # unplug it and release it in the datapath
}


def _load(name):
    return importlib.import_module(SUBCOMMANDS[name], __package__)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        prog="xapi-storage",
        description="Storage for Xen hosts: SMAPIv3 plugins, their installer, and a userspace "
        "block backend.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    # Only import the module of the subcommand asked for; list the others by name.
    wanted = next((a for a in argv if not a.startswith("-")), None)
    for name in SUBCOMMANDS:
        if name == wanted:
            mod = _load(name)
            p = sub.add_parser(name, help=mod.HELP, description=mod.HELP)
            mod.add_arguments(p)
            p.set_defaults(_run=mod.run)
        else:
            try:
                helptext = _load(name).HELP if wanted is None else None
            except ImportError:
                helptext = "(not available in this build)"
            sub.add_parser(name, help=helptext, add_help=False)
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    return args._run(args) or 0


if __name__ == "__main__":
    sys.exit(main())
