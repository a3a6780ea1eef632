"""The toy plugin after a "release" that dropped most methods (for the installer's tests)."""
from xapi_storage.sdk import base
import sdk_toy


class Volume(base.Volume):
    stat = sdk_toy.Volume.stat


IMPLEMENTATIONS = {"Plugin": sdk_toy.Plugin, "SR": base.SR, "Volume": Volume}
