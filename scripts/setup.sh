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
if [ ! -f "$stamp" ] || [ setup.cfg -nt "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    "$VENV/bin/pip" install --quiet --upgrade pip
    "$VENV/bin/pip" install --quiet -e '.[test]'
    touch "$stamp"
fi
