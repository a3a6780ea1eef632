"""The SDK for SMAPIv3 plugins: subclass the interfaces in `base`, raise the errors in
`errors`, and let `wire` run your class as the daemon's executables expect.

Kept free of heavy imports: every plugin call is a new process.
"""

from .base import SR, Data, Datapath, Plugin, Task, Volume  # noqa: F401
from .errors import (  # noqa: F401
    Activated_on_another_host, Cancelled, InterfaceError, SR_does_not_exist, Sr_not_attached,
    StorageError, Unimplemented, Volume_does_not_exist, XenAPIError,
)
