"""xapi-storage-suite: SMAPIv3 storage plugins, their SDK, and a userspace Xen block backend.

Keep this module empty of imports: every plugin executable is a new process and pays for
whatever is imported here.
"""

__version__ = "0.1.0"
