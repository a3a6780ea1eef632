"""An emulation of the toolstack around storage plugins, for tests, the test bed and operators.

    daemon.py     xapi-storage-script: how it runs executables, registers datapaths and
                  chooses one for a volume; the VDI-level calls (attach, activate, ...)
    xenopsd.py    what xenopsd does with an attach result: XenStore nodes, the udev `block`
                  script, the wait for hotplug-status, clean and hard unplug
    sequences.py  ONE table of the call sequences per operation (VM start and shutdown, VBD
                  plug/unplug, dom0 plug, static-vdis, live migration), and a runner

Pure Python: it runs in the test bed's dom0 and against the simulated Xen alike.
"""
