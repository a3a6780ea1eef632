"""Only here to build the two small C extensions with cffi at install time (the ring's memory
barriers, and batched positional I/O); all metadata lives in setup.cfg."""
from setuptools import setup

setup(cffi_modules=["lib/xapi_storage/blkback/_fence_build.py:ffibuilder",
                    "lib/xapi_storage/blkback/_pio_build.py:ffibuilder"])
