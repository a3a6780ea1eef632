"""Run an external tool (lvm2, mount, showmount, fuser) with a time limit, for volume plugins.

    run(argv, timeout=...) -> Result(argv, rc, stdout, stderr)

Arguments are always a list (never a shell line), the environment is the caller's with
LC_ALL=C (messages are parsed in English) and stdin is /dev/null (a tool that would ask a
question gets end-of-file and says no). The tool runs in its own process group; past its time
limit the whole group is killed and CommandTimeout is raised, so no plugin call waits forever
on a hung device or server (the daemon that calls us has no time limit of its own). A process
in uninterruptible sleep cannot be reaped until the kernel lets it go: the group is killed and
we stop waiting after a short grace, leaving the zombie to init.
"""

import os
import signal
import subprocess

DEFAULT_TIMEOUT = 120.0


class CommandTimeout(Exception):
    def __init__(self, argv, timeout):
        super().__init__(f"{' '.join(argv)}: no answer within {timeout:g} s (killed)")
        self.argv = argv
        self.timeout = timeout


class Result:
    __slots__ = ("argv", "rc", "stdout", "stderr")

    def __init__(self, argv, rc, stdout, stderr):
        self.argv = argv
        self.rc = rc
        self.stdout = stdout
        self.stderr = stderr

    def __repr__(self):
        return f"Result({self.argv!r}, rc={self.rc}, stderr={self.stderr[-200:]!r})"


def run(argv, timeout=DEFAULT_TIMEOUT, env=None):
    """Run argv (a list of strings) and return its Result; FileNotFoundError if the tool is
    not installed; CommandTimeout past `timeout` seconds."""
    full_env = dict(os.environ)
    full_env["LC_ALL"] = "C"
    if env:
        full_env.update(env)
    proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, universal_newlines=True, env=full_env,
                            start_new_session=True, close_fds=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        raise CommandTimeout(list(argv), timeout) from None
    except BaseException:
        _kill_group(proc)
        raise
    return Result(list(argv), proc.returncode, out, err)


def _kill_group(proc):
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except OSError:
        pass
    try:
        proc.communicate(timeout=5)
    except (subprocess.TimeoutExpired, OSError, ValueError):
        pass
