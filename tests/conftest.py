"""Shared test configuration. Each area keeps its fixtures in its own tests/<area>/conftest.py."""

import signal


def _interrupt(signum, _frame):
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_configure(config):
    """A run killed by `timeout` (SIGTERM) or a closed terminal (SIGHUP) unwinds like Ctrl-C:
    every fixture's teardown and every test's `finally` run, so the servers, simulated Xens
    and files they started go with it instead of outliving the run."""
    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) in (signal.SIG_DFL, None):
            signal.signal(sig, _interrupt)
