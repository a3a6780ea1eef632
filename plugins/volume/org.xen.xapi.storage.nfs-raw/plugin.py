#!/usr/bin/env python3
# A SMAPIv3 plugin executable, laid out by `xapi-storage install`: every method of the
# plugin is a copy of this file, named Interface.method; the SDK dispatches on the name.
# Python 3 source, runnable by runpy (xapi's observer). Do not edit: rerun the installer.
from xapi_storage.sdk.wire import main

main("xapi_storage.volume.nfs_raw")
