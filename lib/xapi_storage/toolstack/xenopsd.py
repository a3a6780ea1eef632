"""What xenopsd does with a datapath's attach result: the VBD's XenStore nodes, the udev
`block` script, the wait for `hotplug-status`, and both unplugs.

Read from xen-api `ocaml/xenopsd/xc/device.ml` (`Generic.add_device`, `Vbd_Common.add_async`,
`Generic.clean_shutdown*`, `Generic.hard_shutdown*`), `device_common.ml` (paths),
`xenbus_utils.ml` (permissions), `xenops_server_xen.ml` (backend from the attach result) and
`ocaml/xenopsd/scripts/block` (the udev script):

* `vbd_nodes(...)` computes, without I/O, every directory (with its permissions) and key of
  one plug: the frontend `/local/domain/<G>/device/vbd/<devid>` (owner G, backend may read),
  its read-only twin `/xenops/domain/<G>/device/vbd/<devid>` (dom0's), the backend
  `/local/domain/<B>/backend/<kind>/<G>/<devid>` (owner B, frontend may read), the private
  `/xapi/<vm uuid>/private/<kind>/<devid>` and hotplug `/xapi/<vm uuid>/hotplug/<G>/<kind>/<devid>`
  directories (owner B), and `/local/domain/<G>/xenserver/device/<kind>/<devid>` (owner G);
* `plug(xs, ...)` writes them in ONE transaction, runs what udev's `block` script does for
  the new backend (`block_add`: physical-device = "%x:%x" major:minor of `params`, or
  physical-device-path for an `nbd:unix:` params; `hotplug-status=connected`), then waits
  (bounded) for `hotplug-status` or `hotplug-error`, as xenopsd does - not for Connected;
* `clean_unplug` (VBD.unplug): online=0 and state=5 in one transaction, wait for the frontend's
  Closed (6) or its disappearance, remove the frontend, run `block_remove`, remove the rest;
  `hard_unplug` (VM shutdown, unplug --force): online=0, remove the frontend, give the backend
  a moment to close, then remove everything.

Kinds: `vbd`, `vbd3`, `qdisk`, `9pfs` are accepted (others fail at plug time, as in xenopsd);
precedence: `backend_kind` argument (VBD other-config backend-kind) > XenDisk.backend_type >
`default_kind` (XCP-ng 8.3: vbd3). The backend `params` is the BlockDevice path, else the File
path, else the Nbd URI, else ""; XenDisk.params becomes `qemu-params` only when there is no
BlockDevice/File (a two-word value is split into physical-device-path + physical-device);
XenDisk.extra becomes `sm-data/<k>`, plus `sm-data/backend-kind`. Within one implementation
kind the last entry wins.

Only the frontends' view differs from a real host here: a guest started by `xl` (the test
bed) has its own disks only under /local/domain/<G>/device/vbd, so the free device number
looks there as well as under /xenops.
"""

import os

from ..blkback import toolstack as _names
from .daemon import wait_for

SUPPORTED_KINDS = ("vbd", "vbd3", "qdisk", "9pfs")
DEFAULT_KIND = "vbd3"
HOTPLUG_TIMEOUT = 60.0
UNPLUG_TIMEOUT = 30.0


class DeviceError(Exception):
    """A plug or unplug the toolstack refuses or that failed (message says which)."""


def implementations(result):
    """{kind: payload} of an attach result, the last of each kind winning."""
    out = {}
    for impl in (result or {}).get("implementations", []):
        if isinstance(impl, list) and len(impl) == 2:
            out[impl[0]] = impl[1]
    return out


def backend_of(result, backend_kind=None, default_kind=DEFAULT_KIND):
    """(kind, params, extra backend keys) that xenopsd derives from an attach result for a
    guest. Raises DeviceError as xenopsd does (no XenDisk; unknown kind)."""
    impls = implementations(result)
    disk = impls.get("XenDisk")
    if disk is None:
        raise DeviceError("Could not find XenDisk implementation: " + repr(result))
    kind = backend_kind or disk.get("backend_type") or default_kind
    if kind not in SUPPORTED_KINDS:
        raise DeviceError(f"Unknown_device_type {kind!r} (xenopsd accepts "
                          f"{', '.join(SUPPORTED_KINDS)})")
    extra = [(f"sm-data/{k}", v) for k, v in sorted((disk.get("extra") or {}).items())]
    extra.append(("sm-data/backend-kind", kind))
    if "BlockDevice" in impls:
        params = impls["BlockDevice"]["path"]
    elif "File" in impls:
        params = impls["File"]["path"]
    else:
        params = impls["Nbd"]["uri"] if "Nbd" in impls else ""
        extra.append(("qemu-params", disk.get("params", "")))
    return kind, params, extra


def dom0_path(result):
    """What xapi uses for a dom0 plug (VDI copy, export): the first of File, BlockDevice path;
    None if neither (it would then run nbd-client on the Nbd)."""
    impls = implementations(result)
    for k in ("File", "BlockDevice"):
        if k in impls:
            return impls[k]["path"]
    return None


def vm_uuid(xs, domid):
    """The VM uuid xenopsd files private nodes under (its fallback for an unknown one)."""
    vm = xs.read(f"/local/domain/{domid}/vm")
    uuid = xs.read(f"{vm}/uuid") if vm else None
    if not uuid and vm and vm.startswith("/vm/"):
        uuid = vm[len("/vm/"):]
    return uuid or f"unknown-domid-{domid}"


class Vbd:
    """The paths of one plugged VBD."""

    def __init__(self, frontend, backend_domid, kind, devid, uuid):
        self.frontend, self.backend_domid, self.kind, self.devid = frontend, backend_domid, kind, devid
        self.uuid = uuid
        self.fe = f"/local/domain/{frontend}/device/vbd/{devid}"
        self.fe_ro = f"/xenops/domain/{frontend}/device/vbd/{devid}"
        self.be = f"/local/domain/{backend_domid}/backend/{kind}/{frontend}/{devid}"
        self.private = f"/xapi/{uuid}/private/{kind}/{devid}"
        self.hotplug = f"/xapi/{uuid}/hotplug/{frontend}/{kind}/{devid}"
        self.xenserver = f"/local/domain/{frontend}/xenserver/device/{kind}/{devid}"
        self.error = f"/local/domain/{frontend}/error/device/vbd/{devid}"
        self.be_error = f"/local/domain/{backend_domid}/error/backend/{kind}/{frontend}"

    @property
    def name(self):
        return _names.xvd_name(disk_of_devid(self.devid))

    def to_dict(self):
        return {"frontend": self.frontend, "backend_domid": self.backend_domid,
                "kind": self.kind, "devid": self.devid, "uuid": self.uuid}

    @classmethod
    def from_dict(cls, d):
        return cls(d["frontend"], d["backend_domid"], d["kind"], d["devid"], d["uuid"])


def disk_of_devid(devid):
    if devid >> 28:
        return (devid >> 8) & 0xFFFFF
    return (devid >> 4) & 0xF


def vbd_nodes(vbd, params, extra, mode="w", device_type="disk", removable=False,
              protocol=None, polling=None, private=None):
    """[(directory, perms, [(key, value), ...]), ...] of one plug, in the order xenopsd
    writes them in its transaction. Pure."""
    g, b = vbd.frontend, vbd.backend_domid
    front = [("backend", vbd.be), ("backend-id", str(b)), ("state", "1"),
             ("virtual-device", str(vbd.devid)), ("device-type", device_type)]
    if protocol:
        front.append(("protocol", protocol))
    back = [("frontend", vbd.fe), ("frontend-id", str(g)), ("online", "1"),
            ("removable", "1" if removable else "0"), ("state", "1"), ("dev", vbd.name),
            ("type", "phy"), ("mode", mode), ("params", params)]
    keys = dict(back)
    for k, v in extra:
        keys[k] = v
    qemu = keys.get("qemu-params", "")
    words = qemu.split(" ")
    if len(words) == 2:
        keys["physical-device"] = words[1]
        keys["physical-device-path"] = words[0]
    for k, v in (polling or {}).items():
        keys[k] = str(v)
    return [
        (vbd.fe, [f"n{g}", f"r{b}"], front),
        (vbd.fe_ro, ["n0"], [("backend", vbd.be)]),
        (vbd.be, [f"n{b}", f"r{g}"], list(keys.items())),
        (vbd.hotplug, [f"n{b}"], []),
        (vbd.private, [f"n{b}"], [("backend-kind", vbd.kind), ("backend-id", str(b))]
         + sorted((private or {}).items())),
        (vbd.xenserver, [f"n{g}"], []),
    ]


def free_devid(xs, guest):
    """The next xvd number after the highest one the guest uses (xenopsd's free_device),
    counting /xenops and the guest's own device/vbd (a guest started outside xenopsd)."""
    used = set(xs.list(f"/xenops/domain/{guest}/device/vbd"))
    used |= set(xs.list(f"/local/domain/{guest}/device/vbd"))
    disks = [disk_of_devid(int(d)) for d in used if d.isdigit()]
    disk = max(disks) + 1 if disks else 0
    return _names.xvd_devid(disk)


def write_nodes(xs, nodes):
    """Write every directory and key of `nodes` in one transaction; refuse (DeviceError) if
    the frontend or its read-only twin exists already (xenopsd:
    Device_frontend_already_connected; a guest's own disk is never overwritten)."""
    def tx():
        fe, fe_ro = nodes[0][0], nodes[1][0]
        for p in (fe_ro, fe):
            if xs.read(p + "/backend") is not None:
                raise DeviceError(f"{p} exists: the device number is taken")
        for path, _perms, _keys in nodes[:3]:
            xs.rm(path)
        for path, perms, keys in nodes:
            xs.mkdir(path)
            xs.set_perms(path, perms)
            for k, v in keys:
                xs.write(f"{path}/{k}", v)
    xs.transaction(tx)


# --- the udev `block` script --------------------------------------------------------------------

def block_add(xs, vbd):
    """What `block add` does for a backend: physical-device (or -path) unless present, then
    ${HOTPLUG}/hotplug=online and hotplug-status=connected."""
    be = vbd.be
    if vbd.kind != "9pfs":
        params = xs.read(f"{be}/params") or ""
        if params.startswith("nbd:unix:"):
            sock = params[len("nbd:unix:"):].split(":", 1)[0]
            if xs.read(f"{be}/physical-device-path") is None:
                xs.write(f"{be}/physical-device-path", os.path.realpath(sock))
        else:
            try:
                st = os.stat(os.path.realpath(params))
            except OSError as e:
                # the real script's `stat` fails and it goes on with an empty value
                st = None
                xs.write(f"{be}/hotplug-error", f"{params}: {e.strerror}")
            if st is not None and xs.read(f"{be}/physical-device") is None:
                dev = st.st_rdev             # stat %t:%T: 0:0 for a regular file
                xs.write(f"{be}/physical-device", "%x:%x" % (os.major(dev), os.minor(dev)))
    xs.write(f"{vbd.hotplug}/hotplug", "online")
    xs.write(f"{be}/hotplug-status", "connected")


def block_remove(xs, vbd):
    xs.rm(f"{vbd.be}/hotplug-status")
    xs.rm(f"{vbd.hotplug}/hotplug")


# --- plug and unplug ----------------------------------------------------------------------------

def plug(xs, guest, result, backend_domid=0, readonly=False, device_type="disk",
         backend_kind=None, default_kind=DEFAULT_KIND, devid=None, protocol=None,
         polling=None, private=None, run_block_script=True, timeout=HOTPLUG_TIMEOUT,
         attempts=16):
    """Plug the attach `result` into domain `guest` as xenopsd does; returns the Vbd.

    Waits for hotplug-status (or hotplug-error: DeviceError, after removing the nodes) at most
    `timeout` seconds. A device number taken by a concurrent plug is picked again. `private`:
    extra keys of the VBD's private directory (xenopsd's extra_private_keys)."""
    kind, params, extra = backend_of(result, backend_kind, default_kind)
    uuid = vm_uuid(xs, guest)
    for _ in range(attempts if devid is None else 1):
        n = devid if devid is not None else free_devid(xs, guest)
        vbd = Vbd(int(guest), int(backend_domid), kind, n, uuid)
        nodes = vbd_nodes(vbd, params, extra, "r" if readonly else "w", device_type,
                          protocol=protocol, polling=polling, private=private)
        try:
            write_nodes(xs, nodes)
            break
        except DeviceError:
            if devid is not None:
                raise
    else:
        raise DeviceError(f"no free device number in domain {guest} after {attempts} attempts")
    try:
        if run_block_script:
            block_add(xs, vbd)

        def hotplug():
            if xs.read(f"{vbd.be}/hotplug-error") is not None:
                return "error"
            return xs.read(f"{vbd.be}/hotplug-status")
        try:
            status = wait_for(f"{vbd.be}/hotplug-status", hotplug, timeout)
        except TimeoutError as e:
            raise DeviceError(str(e)) from None
        if status == "error":
            raise DeviceError(f"hotplug error for {vbd.be}: {xs.read(vbd.be + '/hotplug-error')}")
    except BaseException:
        remove(xs, vbd)
        raise
    return vbd


def remove(xs, vbd):
    """rm_device_state, and the private/hotplug directories: every node of the plug."""
    for p in (vbd.fe_ro, vbd.fe, vbd.be, vbd.be_error, vbd.error.rsplit("/", 1)[0],
              vbd.hotplug, vbd.private, vbd.xenserver):
        xs.rm(p)
    _prune(xs, vbd)


def _prune(xs, vbd):
    """Remove parents left empty by `remove` that a toolstack made for this VBD alone."""
    b = f"/local/domain/{vbd.backend_domid}"
    for p in (f"{b}/backend/{vbd.kind}/{vbd.frontend}", f"{b}/backend/{vbd.kind}", f"{b}/backend",
              f"{b}/error/backend/{vbd.kind}", f"{b}/error/backend", f"{b}/error",
              f"/local/domain/{vbd.frontend}/device/vbd",
              f"/local/domain/{vbd.frontend}/error/device/vbd",
              f"/local/domain/{vbd.frontend}/error/device",
              f"/xenops/domain/{vbd.frontend}/device/vbd", f"/xenops/domain/{vbd.frontend}/device",
              f"/xenops/domain/{vbd.frontend}", "/xenops/domain", "/xenops",
              f"/xapi/{vbd.uuid}/hotplug/{vbd.frontend}/{vbd.kind}",
              f"/xapi/{vbd.uuid}/hotplug/{vbd.frontend}", f"/xapi/{vbd.uuid}/hotplug",
              f"/xapi/{vbd.uuid}/private/{vbd.kind}", f"/xapi/{vbd.uuid}/private",
              f"/xapi/{vbd.uuid}", "/xapi",
              f"/local/domain/{vbd.frontend}/xenserver/device/{vbd.kind}",
              f"/local/domain/{vbd.frontend}/xenserver/device",
              f"/local/domain/{vbd.frontend}/xenserver"):
        try:
            if xs.read(p) is not None and not xs.list(p):
                xs.rm(p)
        except OSError:
            pass


def _remove_after_frontend(xs, vbd, timeout):
    """Delete the frontend; the kernel's backend then closes (state 6) and goes, and udev runs
    `block remove`: give it the time a backend needs (at most 10 s), then delete the rest."""
    xs.rm(vbd.fe)
    xs.rm(vbd.fe_ro)
    try:
        wait_for(f"{vbd.be}/state to become 6",
                 lambda: xs.read(f"{vbd.be}/state") in (None, "6"), min(timeout, 10))
    except TimeoutError:
        pass
    block_remove(xs, vbd)
    remove(xs, vbd)


def clean_unplug(xs, vbd, timeout=UNPLUG_TIMEOUT):
    """VBD.unplug: ask the backend to close (online=0, state=5), wait for the frontend to
    close, remove it, then the rest. DeviceError (nodes left in place, as xenopsd leaves
    them) if the frontend does not close within `timeout`."""
    def tx():
        state = xs.read(f"{vbd.be}/state")
        if state is None:
            return                      # gone already: never re-create a node by writing it
        xs.write(f"{vbd.be}/online", "0")
        if state != "6":
            xs.write(f"{vbd.be}/state", "5")
    xs.transaction(tx)

    def closed():
        s = xs.read(f"{vbd.fe}/state")
        return s is None or s == "6"
    try:
        wait_for(f"{vbd.fe}/state to become 6", closed, timeout)
    except TimeoutError as e:
        raise DeviceError(f"the guest did not release {vbd.name}: {e}") from None
    _remove_after_frontend(xs, vbd, timeout)


def hard_unplug(xs, vbd, timeout=UNPLUG_TIMEOUT):
    """VM shutdown / unplug --force: online=0, delete the frontend, give the backend a
    bounded moment to close, then delete every node."""
    if xs.read(f"{vbd.be}/state") is not None:
        xs.write(f"{vbd.be}/online", "0")
    _remove_after_frontend(xs, vbd, timeout)


def find_vbds(xs, guest, backend_domid=0):
    """The Vbds of `guest` that this toolstack plugged (found through /xenops)."""
    out = []
    uuid = vm_uuid(xs, guest)
    for devid in xs.list(f"/xenops/domain/{guest}/device/vbd"):
        be = xs.read(f"/xenops/domain/{guest}/device/vbd/{devid}/backend") or ""
        parts = be.split("/")
        if len(parts) == 8 and parts[4] == "backend" and devid.isdigit():
            out.append(Vbd(int(guest), int(parts[3]), parts[5], int(devid), uuid))
    return out


def open_xenstore(path=None):
    """A XenStore connection (xapi_storage.blkback.server.XenStore) to `path`, by default the
    one of $XAPI_STORAGE_XEN (real or simulated Xen)."""
    from ..blkback.server import XenStore
    if path is None:
        from ..xen import open_xen
        path = open_xen().xenstore_path
    return XenStore(path)
