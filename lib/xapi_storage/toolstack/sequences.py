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

import os

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
    # XenStore; xapi uses the File, else BlockDevice path (it must be under /dev/), else runs
    # nbd-client on the Nbd
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
    # --- the volume plugin's side (xapi's SR and VDI operations; main.ml's handlers) ---
    # xe sr-create: SR.create on one host, then every host's PBD.plug (SR.attach, SR.stat)
    "sr-create": (("daemon", "sr_create"), ("daemon", "sr_attach")),
    # PBD.plug (xe pbd-plug, host boot, xe sr-create)
    "sr-attach": (("daemon", "sr_attach"),),
    # xe pbd-unplug (every host), then xe sr-destroy: xapi attaches the SR again on one host
    # and destroys it attached (storage_access.ml destroy_sr; SR.detach only if that fails)
    "sr-destroy": (("daemon", "sr_detach"), ("daemon", "sr_attach"), ("daemon", "sr_destroy")),
    # xe sr-scan (and xapi's periodic scan)
    "sr-scan": (("daemon", "sr_scan"),),
    # xe vdi-create
    "vdi-create": (("daemon", "vdi_create"),),
    # xe vdi-snapshot (and each disk of xe vm-snapshot); one more Volume.set per VDI tag
    "vdi-snapshot": (("daemon", "vdi_snapshot"),),
    # xe vdi-resize
    "vdi-resize": (("daemon", "vdi_resize"),),
    # xe vdi-destroy
    "vdi-destroy": (("daemon", "vdi_destroy"),),
    # VM start with a non-persistent disk (VDI on-boot=reset) and a datapath without
    # NONPERSISTENT: the daemon boots a clone, named by the key clone-on-boot, and every
    # datapath call stats the volume, then the clone
    "vm-start-nonpersistent": (("daemon", "epoch_begin_clone"), ("daemon", "attach_clone"),
                               ("daemon", "activate_clone"), ("xenopsd", "plug")),
    "vm-shutdown-nonpersistent": (("xenopsd", "hard_unplug"), ("daemon", "deactivate_clone"),
                                  ("daemon", "dp_destroy_clone"), ("daemon", "epoch_end_clone")),
    # xe vdi-copy into the same SR: a new VDI, both plugged in dom0 ("u0_" tokens), xapi's
    # sparse_dd copies from one /dev path to the other, both unplugged. "daemon@copy" acts on
    # the new VDI
    "dom0-copy": (("daemon@copy", "vdi_create"), ("daemon", "attach"), ("daemon", "activate"),
                  ("daemon@copy", "attach"), ("daemon@copy", "activate"), ("xapi", "sparse_dd"),
                  ("daemon", "dp_destroy"), ("daemon@copy", "dp_destroy")),
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
    "sr_create": ("SR.create",),
    "sr_attach": ("SR.attach", "SR.stat"),
    "sr_detach": ("SR.detach",),
    "sr_destroy": ("SR.destroy",),
    "sr_scan": ("SR.stat", "SR.ls"),
    "vdi_create": ("Volume.create", "Volume.set"),
    "vdi_snapshot": ("Volume.snapshot",) + ("Volume.set",) * 5,
    "vdi_resize": ("Volume.resize", "Volume.stat"),
    "vdi_destroy": ("Volume.stat", "Volume.destroy"),       # twice with clone-on-boot
    # with clone-on-boot (a non-persistent disk, datapath without NONPERSISTENT)
    "epoch_begin_clone": ("Volume.stat", "Volume.clone", "Volume.set"),
    "attach_clone": ("Volume.stat", "Volume.stat", "Datapath.attach"),
    "activate_clone": ("Volume.stat", "Volume.stat", "Datapath.activate"),
    "deactivate_clone": ("Volume.stat", "Volume.stat", "Datapath.deactivate"),
    "dp_destroy_clone": ("Volume.stat", "Volume.stat", "Datapath.deactivate", "Datapath.detach"),
    "epoch_end_clone": ("Volume.stat", "Volume.destroy", "Volume.unset"),
}

#: the SMAPIv2 call xapi (or xenopsd) makes to the daemon for each daemon step (for the docs)
SMAPIV2 = {
    "epoch_begin": "VDI.epoch_begin", "epoch_end": "VDI.epoch_end", "attach": "VDI.attach3",
    "activate": "VDI.activate3", "activate_readonly": "VDI.activate_readonly",
    "deactivate": "VDI.deactivate", "detach": "VDI.detach", "dp_destroy": "DP.destroy2",
    "sr_create": "SR.create", "sr_attach": "SR.attach", "sr_scan": "SR.scan2",
    "sr_detach": "SR.detach", "sr_destroy": "SR.destroy",
    "vdi_create": "VDI.create", "vdi_snapshot": "VDI.snapshot", "vdi_resize": "VDI.resize",
    "vdi_destroy": "VDI.destroy",
}

#: the steps of the volume plugin alone, and the ctx keys (beyond dbg and plugin) their
#: Daemon methods take, in order
VOLUME_STEPS = {
    "sr_create": ("uuid", "configuration", "name", "description"),
    "sr_attach": ("configuration",),
    "sr_detach": ("sr",),
    "sr_destroy": ("sr",),
    "sr_scan": ("sr",),
    "vdi_create": ("sr", "name", "description", "size", "sharable", "vdi_type"),
    "vdi_snapshot": ("sr", "key", "content_id", "vdi_type", "tags"),
    "vdi_resize": ("sr", "key", "new_size"),
    "vdi_destroy": ("sr", "key"),
}
#: where each volume step leaves its answer in ctx
VOLUME_RESULTS = {"sr_create": "configuration", "sr_attach": "sr", "sr_scan": "volumes",
                  "vdi_create": "volume", "vdi_snapshot": "snapshot", "vdi_resize": "virtual_size"}


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
    for a dom0 plug, the dom0 path; None when the datapath answered only an Nbd, whose URI is
    then "nbd": xapi runs nbd-client on it)."""

    def __init__(self, daemon, xs=None, hotplug_timeout=xenopsd.HOTPLUG_TIMEOUT,
                 unplug_timeout=xenopsd.UNPLUG_TIMEOUT):
        self.daemon, self.xs = daemon, xs
        self.hotplug_timeout, self.unplug_timeout = hotplug_timeout, unplug_timeout

    def run(self, operation, ctx):
        ctx.setdefault("dbg", f"xapi-storage toolstack {operation}")
        if operation in ("dom0-plug", "dom0-copy") or (operation == "dom0-unplug" and "dp" in ctx):
            ctx.setdefault("dp", "copy" if operation == "dom0-copy" else "0")
            ctx["domain"] = dom0_token(ctx["dp"])
        for actor, step in SEQUENCES[operation]:
            getattr(self, "_" + actor.split("@")[0].replace("-", "_"))(actor, step, ctx)
        if operation == "dom0-plug":
            path = xenopsd.dom0_path(ctx["backend"])
            nbd = xenopsd.implementations(ctx["backend"]).get("Nbd")
            if path is None and isinstance(nbd, dict) and isinstance(nbd.get("uri"), str):
                # xapi connects nbd-client to it and uses the /dev/nbdN that gives
                ctx["device"], ctx["nbd"] = None, nbd["uri"]
                return ctx
            if path is None or not path.startswith("/dev/"):
                raise xenopsd.DeviceError(
                    f"a dom0 plug needs a File or BlockDevice under /dev/ (xapi cuts the first "
                    f"five characters), or an Nbd; the datapath answered {ctx['backend']!r}")
            ctx["device"] = path
        return ctx

    def _daemon(self, actor, step, ctx):
        d = self.daemon
        if actor == "daemon@copy":
            # the new VDI of a copy: its own ctx, the same SR and plugin
            sub = ctx.setdefault("copy", {})
            for k in ("dbg", "plugin", "sr", "name", "description", "size", "sharable"):
                if k in ctx:
                    sub.setdefault(k, ctx[k])
            if step != "vdi_create":
                sub["key"] = sub["volume"]["key"]
                sub.setdefault("dp", "copy/" + ctx.get("dp", "0"))
                sub["domain"] = dom0_token(sub["dp"])
            return self._daemon("daemon", step, sub)
        if step in VOLUME_STEPS:
            ctx.setdefault("description", "")
            ctx.setdefault("name", "")
            ctx.setdefault("sharable", False)
            ctx.setdefault("vdi_type", "user")
            ctx.setdefault("content_id", "")
            ctx.setdefault("tags", ())
            out = getattr(d, step)(ctx["dbg"], ctx["plugin"],
                                   *[ctx[k] for k in VOLUME_STEPS[step]])
            if step in VOLUME_RESULTS:
                ctx[VOLUME_RESULTS[step]] = out
            return
        if step.endswith("_clone"):
            step = step[:-len("_clone")]        # the daemon's own _stat follows the clone
            if step == "epoch_begin":
                d.epoch_begin(ctx["dbg"], ctx["plugin"], ctx["sr"], ctx["key"], persistent=False)
                return
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

    def _xapi(self, actor, step, ctx):
        """xapi's own work in dom0: sparse_dd copies the source's dom0 path (File, else
        BlockDevice) onto the copy's, the source's size in bytes."""
        src = xenopsd.dom0_path(ctx["backend"])
        dst = xenopsd.dom0_path(ctx["copy"]["backend"])
        for path in (src, dst):
            if path is None or not path.startswith("/dev/"):
                raise xenopsd.DeviceError(f"{step}: a dom0 plug needs a File or BlockDevice "
                                          f"under /dev/; the datapath answered {path!r}")
        with open(src, "rb") as fin, open(dst, "r+b") as fout:
            while True:
                chunk = fin.read(1 << 20)
                if not chunk:
                    break
                fout.write(chunk)
            fout.flush()
            os.fsync(fout.fileno())

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
