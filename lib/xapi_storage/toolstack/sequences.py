"""The call sequences of the toolstack, per operation: ONE table, replayed by `Toolstack`.

Read from xen-api `ocaml/xenopsd/lib/xenops_server.ml` (VBD plug/unplug around VM start and
shutdown, migration), `ocaml/xapi/storage_mux.ml` / `xapi_vbd.ml` (dom0 plugs, DP.destroy2),
`ocaml/xapi-storage-script/main.ml` (what each SMAPIv2 call runs) and `scripts/static-vdis`.

`SEQUENCES[operation]` is a tuple of (actor, step) pairs, in order:

    actor "daemon"       a SMAPIv2 call the daemon serves; DAEMON_CALLS[step] lists the plugin
                         executables it runs (Volume.stat first, every time)
    actor "xenopsd"      XenStore work of xenopsd (xenopsd.plug / clean_unplug / hard_unplug)
    actor "static-vdis"  an executable run in command-line mode (domain "0")
    actor "daemon@src" / "daemon@dst"   the daemon on the migration's source / destination

`plugin_calls(operation, nonpersistent=False)` expands an operation into the executables run,
in order: what a conformance suite replays against a plugin and what docs can print.
`Toolstack(daemon, xs).run(operation, ctx)` performs one, against installed executables and a
(real or simulated) XenStore.
"""

from . import xenopsd
from .daemon import dom0_token

SEQUENCES = {
    # xenopsd VM_start: per VBD, VDI.epoch_begin then VBD_plug (attach3, activate3 or
    # activate_readonly, then the XenStore nodes and the wait for hotplug-status)
    "vm-start": (("daemon", "epoch_begin"), ("daemon", "attach"), ("daemon", "activate"),
                 ("xenopsd", "plug")),
    # VBD.plug of a running VM (hot-plug): the same without epoch_begin
    "vbd-plug": (("daemon", "attach"), ("daemon", "activate"), ("xenopsd", "plug")),
    # VBD.unplug: the guest is asked to let go first, then the storage
    "vbd-unplug": (("xenopsd", "clean_unplug"), ("daemon", "deactivate"),
                   ("daemon", "dp_destroy")),
    # VM shutdown (and VBD.unplug --force): VBDs unplugged by force, then VDI.deactivate,
    # DP.destroy2 (deactivate again, detach), VDI.epoch_end
    "vm-shutdown": (("xenopsd", "hard_unplug"), ("daemon", "deactivate"),
                    ("daemon", "dp_destroy"), ("daemon", "epoch_end")),
    # a dom0 plug by xapi (VDI.copy, export, import, sparse_dd): a "u0_" token, no open, no
    # XenStore; xapi uses the File, else BlockDevice path (it must be under /dev/)
    "dom0-plug": (("daemon", "attach"), ("daemon", "activate")),
    "dom0-unplug": (("daemon", "dp_destroy"),),
    # static-vdis (HA statefile, redo log) at boot, before xapi: command-line mode, domain "0",
    # the volume's first URI
    "static-vdis-attach": (("static-vdis", "Volume.stat"), ("static-vdis", "Datapath.attach"),
                           ("static-vdis", "Datapath.activate")),
    "static-vdis-detach": (("static-vdis", "Volume.stat"), ("static-vdis", "Datapath.deactivate"),
                           ("static-vdis", "Datapath.detach")),
    # intra-pool live migration: destination attach, source deactivate (downtime starts),
    # destination activate (downtime ends), source detach
    "live-migration": (("daemon@dst", "attach"), ("daemon@src", "deactivate"),
                       ("daemon@dst", "activate"), ("daemon@src", "detach")),
}

#: the executables each daemon step runs, in order ({datapath} calls go to the chosen one)
DAEMON_CALLS = {
    "epoch_begin": ("Volume.stat", "Datapath.open?"),      # open: only with NONPERSISTENT
    "epoch_end": ("Volume.stat", "Datapath.close?"),       # close: only with NONPERSISTENT
    "attach": ("Volume.stat", "Datapath.attach"),
    "activate": ("Volume.stat", "Datapath.activate"),
    "activate_readonly": ("Volume.stat", "Datapath.activate_readonly"),
    "deactivate": ("Volume.stat", "Datapath.deactivate"),
    "detach": ("Volume.stat", "Datapath.detach"),
    "dp_destroy": ("Volume.stat", "Datapath.deactivate", "Datapath.detach"),
}


def plugin_calls(operation, nonpersistent=False, readonly=False):
    """The executables `operation` runs, in order. `nonpersistent`: the chosen datapath
    declares NONPERSISTENT (then epoch_begin/epoch_end run Datapath.open/close);
    `readonly`: a read-only VBD on a volume plugin declaring VDI_ACTIVATE_READONLY."""
    out = []
    for actor, step in SEQUENCES[operation]:
        if actor == "static-vdis":
            out.append(step)
        elif actor.startswith("daemon"):
            if step == "activate" and readonly:
                step = "activate_readonly"
            for name in DAEMON_CALLS[step]:
                if name.endswith("?"):
                    if nonpersistent:
                        out.append(name[:-1])
                else:
                    out.append(name)
    return out


class Toolstack:
    """Runs the SEQUENCES against installed plugins (`daemon`, a daemon.Daemon) and a
    XenStore connection `xs` (None for operations without xenopsd steps).

    ctx keys: plugin (volume plugin directory), sr, key, dbg; domain (token; for a guest its
    domid as text); readonly; persistent; for "dom0-plug" dp (the token is made from it);
    for "live-migration" src_domain and domain (the destination). Results land in ctx:
    "backend" (the attach result), "vbd" (xenopsd.Vbd), "device" (the guest's device name or,
    for a dom0 plug, the dom0 path)."""

    def __init__(self, daemon, xs=None, hotplug_timeout=xenopsd.HOTPLUG_TIMEOUT,
                 unplug_timeout=xenopsd.UNPLUG_TIMEOUT):
        self.daemon, self.xs = daemon, xs
        self.hotplug_timeout, self.unplug_timeout = hotplug_timeout, unplug_timeout

    def run(self, operation, ctx):
        ctx.setdefault("dbg", f"xapi-storage toolstack {operation}")
        if operation == "dom0-plug" or (operation == "dom0-unplug" and "dp" in ctx):
            ctx["domain"] = dom0_token(ctx["dp"])
        for actor, step in SEQUENCES[operation]:
            getattr(self, "_" + actor.split("@")[0].replace("-", "_"))(actor, step, ctx)
        if operation == "dom0-plug":
            path = xenopsd.dom0_path(ctx["backend"])
            if path is None or not path.startswith("/dev/"):
                raise xenopsd.DeviceError(
                    f"a dom0 plug needs a File or BlockDevice under /dev/ (xapi cuts the first "
                    f"five characters); the datapath answered {ctx['backend']!r}")
            ctx["device"] = path
        return ctx

    def _daemon(self, actor, step, ctx):
        d = self.daemon
        args = (ctx["dbg"], ctx["plugin"], ctx["sr"], ctx["key"])
        domain = ctx["src_domain"] if actor == "daemon@src" else ctx.get("domain", "")
        if step == "epoch_begin":
            d.epoch_begin(*args, persistent=ctx.get("persistent", True))
        elif step == "epoch_end":
            d.epoch_end(*args)
        elif step == "attach":
            ctx["backend"] = d.attach(*args, domain)
        elif step == "activate":
            d.activate(*args, domain, readonly=ctx.get("readonly", False))
        else:
            getattr(d, step)(*args, domain)

    def _xenopsd(self, actor, step, ctx):
        if step == "plug":
            ctx["vbd"] = xenopsd.plug(self.xs, int(ctx["domain"]), ctx["backend"],
                                      readonly=ctx.get("readonly", False),
                                      backend_kind=ctx.get("backend_kind"),
                                      timeout=self.hotplug_timeout)
            ctx["device"] = ctx["vbd"].name
        else:
            vbd = ctx.get("vbd")
            if vbd is not None:
                getattr(xenopsd, step)(self.xs, vbd, timeout=self.unplug_timeout)

    def _static_vdis(self, actor, step, ctx):
        from .daemon import run_cli
        import os
        d = self.daemon
        if step == "Volume.stat":
            vol = run_cli(os.path.join(d.root, "volume", ctx["plugin"]), "Volume.stat",
                          [ctx["sr"], ctx["key"]], d.timeout, d.env)
            uris = vol.get("uri") or []
            if not uris:
                raise xenopsd.DeviceError(f"static-vdis: volume {ctx['key']} has no URI")
            ctx["uri"] = uris[0]                         # the first, installed or not
            ctx["scheme"] = ctx["uri"].split(":", 1)[0]
            return
        out = run_cli(os.path.join(d.root, "datapath", ctx["scheme"]), step,
                      [ctx["uri"], "0"], d.timeout, d.env)
        if step == "Datapath.attach":
            ctx["backend"] = out
            impls = xenopsd.implementations(out)
            for k in ("BlockDevice", "File"):
                if k in impls:
                    ctx["device"] = impls[k]["path"]
                    break
            else:
                if "Nbd" not in impls:
                    raise xenopsd.DeviceError("static-vdis: no BlockDevice, File or Nbd in "
                                              + repr(out))
