#!/usr/bin/env bash
# Set up this checkout: a virtualenv in .venv with the package (editable) and the test tools,
# on the default python3; and .venv-py3.6 and .venv-py3.12 the same way on CPython 3.6 and 3.12
# from pyenv (`pyenv root`/versions/3.6.*, 3.12.*), the hosts' Pythons the fast tests also run
# on (scripts/test-pythons.sh). A missing pyenv interpreter is skipped loudly here; with CI=true
# it is an error.
# With --testbed, also the host packages the real-Xen test bed needs (QEMU, debootstrap, ...).
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}

if [ "${1:-}" = "--testbed" ]; then
    exec scripts/setup-testbed.sh
fi

# make_venv DIR PYTHON: DIR holds an editable install of '.[test]' made with PYTHON.
make_venv() {
    local venv=$1 python=$2
    if [ ! -x "$venv/bin/python" ]; then
        "$python" -m venv "$venv"
    fi
    local stamp="$venv/.installed"
    # Reinstall when the packaging or a C extension's source changed (the extensions are built
    # by cffi at install time, in place, for the editable install).
    local stale=0 f
    [ -f "$stamp" ] || stale=1
    for f in setup.cfg pyproject.toml setup.py lib/xapi_storage/blkback/_*_build.py; do
        [ "$stale" = 1 ] || [ ! "$f" -nt "$stamp" ] || stale=1
    done
    if [ "$stale" = 1 ]; then
        # pip 21.3 is the last for 3.6 (its own pip 18 has no editable install of a
        # pyproject.toml package); elsewhere the newest
        if "$venv/bin/python" -c 'import sys; sys.exit(sys.version_info >= (3, 7))'; then
            "$venv/bin/pip" install --quiet --upgrade 'pip<21.4'
        else
            "$venv/bin/pip" install --quiet --upgrade pip
        fi
        "$venv/bin/pip" install --quiet -e '.[test]'
        touch "$stamp"
    fi
}

# pyenv_python VERSION: the newest pyenv-installed CPython VERSION.x, or nothing.
pyenv_python() {
    local root
    root=$(pyenv root 2>/dev/null || echo "${PYENV_ROOT:-$HOME/.pyenv}")
    ls -d "$root/versions/$1".* 2>/dev/null | sort -V | tail -n 1 | sed 's|$|/bin/python'"$1"'|'
}

make_venv "$VENV" python3

for v in ${EXTRA_PYTHONS-3.6 3.12}; do
    py=$(pyenv_python "$v")
    if [ -n "$py" ] && [ -x "$py" ]; then
        make_venv ".venv-py$v" "$py"
    elif [ "${CI:-}" = true ]; then
        echo "setup.sh: ERROR: no CPython $v under pyenv (\`pyenv root\`/versions/$v.*):" \
             "CI runs the fast tests on it" >&2
        exit 1
    else
        echo "setup.sh: WARNING: no CPython $v under pyenv (\`pyenv root\`/versions/$v.*):" \
             "its fast tests will be SKIPPED" >&2
    fi
done
