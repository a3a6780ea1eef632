#!/usr/bin/env bash
# Set up this checkout: a virtualenv in .venv with the package (editable) and the test tools.
# With --testbed, also the host packages the real-Xen test bed needs (QEMU, debootstrap, ...).
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}

if [ "${1:-}" = "--testbed" ]; then
    exec scripts/setup-testbed.sh
fi

if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
stamp="$VENV/.installed"
# Reinstall when the packaging or a C extension's source changed (the extensions are built by
# cffi at install time, in place, for the editable install).
stale=0
[ -f "$stamp" ] || stale=1
for f in setup.cfg pyproject.toml setup.py lib/xapi_storage/blkback/_*_build.py; do
    [ "$stale" = 1 ] || [ ! "$f" -nt "$stamp" ] || stale=1
done
if [ "$stale" = 1 ]; then
    "$VENV/bin/pip" install --quiet --upgrade pip
    "$VENV/bin/pip" install --quiet -e '.[test]'
    touch "$stamp"
fi
