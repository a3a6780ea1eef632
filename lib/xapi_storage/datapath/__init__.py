"""Datapath plugins: the shared lifecycle (`lifecycle.Lifecycle`) and our datapaths.

    lifecycle.py   the base every datapath plugin subclasses (ours, and vendors')
    blkback.py     `blkback`: the Linux kernel's xen-blkback, through a loop device for files
"""
