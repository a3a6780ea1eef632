#!/usr/bin/env bash
# `make test`: every test on the default python3 (.venv, the real-Xen test bed included), and
# the fast tests (-m "not xen") on the hosts' other Pythons, CPython 3.6 and 3.12
# (.venv-py3.6, .venv-py3.12, made by scripts/setup.sh from pyenv), alongside it: the extra
# interpreters run one after the other while the default one runs, each into its own log.
# When all have finished, their logs are printed, then one summary line per interpreter; the
# exit status is non-zero if any run failed. A missing interpreter fails the run with CI=true
# and is skipped, loudly, without.
#   scripts/test-all.sh [pytest arguments for the default interpreter's run]
# EXTRA_PYTHONS="3.6 3.12" (the default) names the extra interpreters; empty: none.
# EXTRA_PYTEST_ARGS: more pytest arguments for their runs (e.g. a test file), none by default.
set -uo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
logs=$(mktemp -d "${TMPDIR:-/tmp}/xapi-storage-tests.XXXXXX")
extras_pid=
# ended early (CI's timeout, Ctrl-C): the extra interpreters' runs end with us
cleanup() {
    if [ -n "$extras_pid" ]; then
        pkill -TERM -P "$extras_pid" 2>/dev/null
        kill -TERM "$extras_pid" 2>/dev/null
    fi
    rm -rf "$logs"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

extras=()
missing=()
for v in ${EXTRA_PYTHONS-3.6 3.12}; do
    if [ -x ".venv-py$v/bin/python" ]; then
        extras+=("$v")
    else
        missing+=("$v")
    fi
done

run_extras() {
    local v
    for v in "${extras[@]}"; do
        ".venv-py$v/bin/python" -m pytest -m "not xen" -p no:cacheprovider -q \
            ${EXTRA_PYTEST_ARGS:-} >"$logs/py$v.log" 2>&1
        echo $? >"$logs/py$v.rc"
    done
}

if [ "${#extras[@]}" -gt 0 ]; then
    run_extras &
    extras_pid=$!
fi
"$VENV/bin/python" -m pytest "$@" 2>&1 | tee "$logs/default.log"
main_rc=${PIPESTATUS[0]}
if [ -n "$extras_pid" ]; then
    wait "$extras_pid"
    extras_pid=
fi

status=0
summary=()
last_line() { grep -E '(passed|failed|error|no tests ran)' "$1" | tail -n 1; }
summary+=("$("$VENV/bin/python" -c 'import platform; print("python " + platform.python_version())') (all tests): rc=$main_rc: $(last_line "$logs/default.log")")
[ "$main_rc" = 0 ] || status=1
for v in "${extras[@]}"; do
    rc=$(cat "$logs/py$v.rc" 2>/dev/null || echo 1)
    echo
    echo "================ fast tests on $(".venv-py$v/bin/python" -c 'import platform; print("python " + platform.python_version())') (.venv-py$v) ================"
    cat "$logs/py$v.log"
    summary+=("python $v (fast tests, -m 'not xen'): rc=$rc: $(last_line "$logs/py$v.log")")
    [ "$rc" = 0 ] || status=1
done
for v in "${missing[@]}"; do
    if [ "${CI:-}" = true ]; then
        summary+=("python $v: FAILED: no .venv-py$v (no CPython $v under \`pyenv root\`/versions; run scripts/setup.sh)")
        status=1
    else
        summary+=("python $v: SKIPPED (no .venv-py$v: no CPython $v under \`pyenv root\`/versions)")
    fi
done
echo
echo "================ summary of the runs ================"
printf '%s\n' "${summary[@]}"
if [ "$status" = 0 ]; then
    echo "ALL RUNS PASSED"
else
    echo "SOME RUNS FAILED (see above)"
fi
exit "$status"
