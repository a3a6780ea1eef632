"""Volume plugins (SR and Volume control plane), one module each, plus what they share.

    store       crash-safe records, locks and temporary files in one directory
    datacopy    reflink (FICLONE) or sparse copy (SEEK_DATA/SEEK_HOLE + copy_file_range)
    file_raw    the `file-raw` plugin: SR = directory, volume = sparse raw file + record
    command     external tools (lvm2, mount, ...) run with a time limit
    lvm         every lvm2 command, JSON reports, records stored as LV/VG tags
    lvm_raw     the `lvm-raw` plugin: SR = volume group, volume = logical volume
    nfs_raw     the `nfs-raw` plugin: file_raw on an NFS export it mounts

Each plugin module exports IMPLEMENTATIONS = {"Plugin": ..., "SR": ..., "Volume": ...}.
Kept free of imports: plugin executables import only the module they run.
"""
