"""A real-Xen test bed the project builds and boots itself: Xen 4.17, a Debian bookworm dom0 and
busybox PV guests, under QEMU (TCG). Reusable by vendors: see docs/testing.md.

    from xapi_storage.testbed import TestBed, ensure_images
    with TestBed(ensure_images(), checkout=".") as bed:
        bed.boot()
        print(bed.dom0("xl info").stdout)
"""

from .bed import (Background, BootError, CommandFailed, CommandTimeout, Guest, Result, TestBed,
                  TestBedError, default_run_dir, qemu_binary, unavailable_reason)
from .images import BuildError, Images, cache_root, check_cached, ensure_images, image_key

__all__ = ["Background", "BootError", "BuildError", "CommandFailed", "CommandTimeout", "Guest",
           "Images", "Result", "TestBed", "TestBedError", "cache_root", "check_cached",
           "default_run_dir", "ensure_images", "image_key", "qemu_binary", "unavailable_reason"]
