"""The toolstack's part of a hot-plug, done the way libxl does it (spec §3.2, §3.5 A).

`create_vbd` writes the frontend and the backend directory in ONE transaction with libxl's
permissions, both with state=1; `unplug` asks the backend to go (online=0, state=5);
`remove_vbd` removes both directories. The backend kind defaults to `pyvbd`: the kernel's
blkback only probes `backend/vbd`, so it will never grab our devices.
"""

KIND = "pyvbd"
XVD_MAJOR = 202


class ToolstackError(Exception):
    """The domain or device asked for does not exist or cannot be used (caller's fault)."""


class DeviceExists(ToolstackError):
    """The virtual device number is taken (by the guest's config or a concurrent plug)."""


def xvd_devid(disk):
    """The virtual-device number of xvd<disk> (spec §3.6): 202<<8|disk<<4, extended above 15."""
    if disk < 16:
        return (XVD_MAJOR << 8) | (disk << 4)
    return (1 << 28) | (disk << 8)


def xvd_name(disk):
    s = ""
    n = disk
    while True:
        s = chr(ord("a") + n % 26) + s
        n = n // 26 - 1
        if n < 0:
            return "xvd" + s


def resolve_domain(xs, name_or_id):
    """A domid from a decimal id or a domain name (/local/domain/*/name)."""
    s = str(name_or_id)
    if s.isdigit():
        if xs.read(f"/local/domain/{s}/name") is None and not xs.list(f"/local/domain/{s}"):
            raise ToolstackError(f"no domain with id {s}")
        return int(s)
    found = [int(d) for d in xs.list("/local/domain") if d.isdigit()
             and xs.read(f"/local/domain/{d}/name") == s]
    if not found:
        raise ToolstackError(f"no domain named {s!r}")
    if len(found) > 1:
        raise ToolstackError(f"several domains are named {s!r}: {found}")
    return found[0]


def free_devid(xs, guest, backend_domid=0, kind=KIND, first_disk=1):
    """The first xvd disk (from xvdb) not used in the guest's device/vbd nor our backend."""
    used = set(xs.list(f"/local/domain/{guest}/device/vbd"))
    used |= set(xs.list(f"/local/domain/{backend_domid}/backend/{kind}/{guest}"))
    for disk in range(first_disk, 1 << 20):
        devid = xvd_devid(disk)
        if str(devid) not in used:
            return devid, xvd_name(disk)
    raise ToolstackError(f"no free virtual-device number in domain {guest}")


def paths(guest, devid, backend_domid=0, kind=KIND):
    return (f"/local/domain/{guest}/device/vbd/{devid}",
            f"/local/domain/{backend_domid}/backend/{kind}/{guest}/{devid}")


def _ancestors(path, stop):
    """The parents of `path` below `stop`, deepest first."""
    out = []
    p = path.rsplit("/", 1)[0]
    while len(p) > len(stop):
        out.append(p)
        p = p.rsplit("/", 1)[0]
    return out


def create_vbd(xs, guest, devid, params, *, backend_domid=0, kind=KIND, readonly=False,
               dev_name="xvdb", storage_type="standalone", protocol=None):
    """Write FE and BE nodes in one transaction (perms as libxl sets them).

    Returns (fe, be, created): the two paths, and the parent directories that did not exist
    before (XenStore made them for us; `remove_vbd` removes them again if they are empty).
    Refuses (ToolstackError) if either directory exists already."""
    fe, be = paths(guest, devid, backend_domid, kind)
    g, b = str(guest), str(backend_domid)
    created = []

    def tx():
        if xs.read(f"{fe}/state") is not None or xs.read(f"{be}/state") is not None:
            raise DeviceExists(f"virtual device {devid} of domain {guest} exists already")
        created[:] = [p for p in _ancestors(fe, f"/local/domain/{g}")
                      + _ancestors(be, f"/local/domain/{b}") if xs.read(p) is None]
        xs.mkdir(fe)
        xs.set_perms(fe, [f"n{g}", f"r{b}"])
        for k, v in (("backend", be), ("backend-id", b), ("state", "1"),
                     ("virtual-device", str(devid)), ("device-type", "disk"),
                     ("trusted", "1")) + ((("protocol", protocol),) if protocol else ()):
            xs.write(f"{fe}/{k}", v)
        xs.mkdir(be)
        xs.set_perms(be, [f"n{b}", f"r{g}"])
        for k, v in (("frontend", fe), ("frontend-id", g), ("online", "1"),
                     ("removable", "0"), ("bootable", "1"), ("state", "1"),
                     ("dev", dev_name), ("type", storage_type),
                     ("mode", "r" if readonly else "w"), ("device-type", "disk"),
                     ("params", params), ("discard-enable", "0" if readonly else "1")):
            xs.write(f"{be}/{k}", v)
    xs.transaction(tx)
    return fe, be, created


def plug_vbd(xs, guest, params, *, backend_domid=0, kind=KIND, attempts=16, **options):
    """`free_devid` then `create_vbd`; if another plug took that number between the two (the
    transaction found the directory there), pick again. Returns (devid, name, fe, be, created)."""
    for _ in range(attempts):
        devid, name = free_devid(xs, guest, backend_domid, kind)
        try:
            fe, be, created = create_vbd(xs, guest, devid, params, backend_domid=backend_domid,
                                         kind=kind, dev_name=name, **options)
        except DeviceExists:
            continue
        return devid, name, fe, be, created
    raise ToolstackError(f"could not plug a virtual device into domain {guest}: every free "
                         f"number was taken by a concurrent plug ({attempts} attempts)")


def unplug(xs, be):
    """What `xl block-detach` does first: online=0 and (unless Closed) state=5, together."""
    def tx():
        if xs.read(f"{be}/state") is None:
            return
        xs.write(f"{be}/online", "0")
        if xs.read(f"{be}/state") != "6":
            xs.write(f"{be}/state", "5")
    xs.transaction(tx)


def remove_vbd(xs, fe, be, created=()):
    """Remove both directories; then, if empty, the parents `create_vbd` created and our
    private `backend/<kind>/<G>` and `backend/<kind>` (deepest first). A parent made by one
    plug and still holding another plug's device when the maker leaves stays (empty, once
    that other device goes: nothing records who made it)."""
    errors = []
    for p in (fe, be):
        try:
            xs.rm(p)
        except OSError as e:
            errors.append(e)
    parents = set(created) | set(_ancestors(be, be.rsplit("/", 3)[0]))
    for p in sorted(parents, key=lambda p: -p.count("/")):
        try:
            if not xs.list(p):
                xs.rm(p)
        except OSError as e:
            errors.append(e)
    if errors:
        raise errors[0]
