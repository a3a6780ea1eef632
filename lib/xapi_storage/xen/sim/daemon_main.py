"""`python -m xapi_storage.xen.sim.daemon_main DIR`: the daemon alone (what running() starts)."""

import sys

from .daemon import run

if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m xapi_storage.xen.sim.daemon_main DIR")
    sys.exit(run(sys.argv[1]))
