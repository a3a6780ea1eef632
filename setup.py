"""Only here to build the one C extension (the ring's memory barriers) with cffi at install
time; all metadata lives in setup.cfg."""
from setuptools import setup

setup(cffi_modules=["lib/xapi_storage/blkback/_fence_build.py:ffibuilder"])
