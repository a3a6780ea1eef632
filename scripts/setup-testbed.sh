#!/usr/bin/env bash
# Host packages for the real-Xen test bed (see docs/testing.md). Needs root and Debian's apt.
set -euo pipefail
echo "setup-testbed: nothing to install yet" >&2
