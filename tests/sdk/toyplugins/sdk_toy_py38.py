"""The toy plugin, needing Python 3.8 at import time (math.prod): imports on the installer's
newer Python, not on a host's 3.6 (the installer's observer-mode check must say so)."""

from math import prod  # noqa: F401  (3.8+)

from sdk_toy import IMPLEMENTATIONS  # noqa: F401
