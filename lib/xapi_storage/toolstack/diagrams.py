"""Sequence diagrams (SVG) of the toolstack's operations, drawn from the one table in
sequences.py: who calls whom, in order, down to each plugin executable. Pure: text in, text out.

    python -m xapi_storage.kitdocs docs/vendors     writes them (with the other vendor pages)
"""

from xml.sax.saxutils import escape

from .sequences import DAEMON_CALLS, SEQUENCES, SMAPIV2

XAPI, DAEMON, VOLUME, DATAPATH, XENOPSD, STATIC = (
    "xapi", "xapi-storage-script", "volume plugin", "datapath plugin", "xenopsd", "static-vdis")

HOSTS = {"src": "source host", "dst": "destination host", "copy": "the new VDI"}

# geometry, in pixels
COL, LEFT, TOP, ROW, HEAD = 200, 20, 60, 26, 34


def messages(operation):
    """[(from, to, label)] of an operation, in order; from == to is a note on that lifeline."""
    out = []
    for actor, step in SEQUENCES[operation]:
        kind, _, where = actor.partition("@")
        suffix = f" [{HOSTS.get(where, where)}]" if where else ""
        if kind == "daemon":
            base = step[:-len("_clone")] if step.endswith("_clone") else step
            caller = XENOPSD if base in ("attach", "activate", "activate_readonly",
                                         "deactivate", "detach", "dp_destroy",
                                         "epoch_begin", "epoch_end") \
                and operation.startswith(("vm-", "vbd-", "live-")) else XAPI
            out.append((caller, DAEMON, SMAPIV2.get(base, base) + suffix))
            for name, count in _runs(DAEMON_CALLS[step]):
                label = name.rstrip("?")
                if name.endswith("?"):
                    label += " (NONPERSISTENT datapaths)"
                if count > 1:
                    label += f" ×{count}"
                    if step.endswith("_clone") and name == "Volume.stat":
                        label += " (the disk, then its clone-on-boot)"
                out.append((DAEMON, _plugin_of(label), label + suffix))
        elif kind == "xenopsd":
            out.append((XENOPSD, XENOPSD, _XENOPSD_NOTES.get(step, step)))
        elif kind == "static-vdis":
            out.append((STATIC, _plugin_of(step), f"{step} (command line)"))
        elif kind == "xapi":
            out.append((XAPI, XAPI, _XAPI_NOTES.get(step, step)))
    return out


_XENOPSD_NOTES = {
    "plug": "writes the VBD's XenStore nodes, waits for hotplug-status",
    "clean_unplug": "asks the guest to let go (state 5), waits, removes the nodes",
    "hard_unplug": "removes the frontend and backend nodes at once",
}
_XAPI_NOTES = {"sparse_dd": "sparse_dd copies between the two dom0 paths"}


def _plugin_of(name):
    return DATAPATH if name.startswith(("Datapath.", "Data.")) else VOLUME


def _runs(names):
    out = []
    for n in names:
        if out and out[-1][0] == n:
            out[-1] = (n, out[-1][1] + 1)
        else:
            out.append((n, 1))
    return out


def participants(msgs):
    order = [XAPI, XENOPSD, STATIC, DAEMON, VOLUME, DATAPATH]
    used = {p for m in msgs for p in m[:2]}
    return [p for p in order if p in used]


def svg(operation, title=None):
    """The sequence diagram of `operation` as an SVG document."""
    msgs = messages(operation)
    cols = participants(msgs)
    x = {p: LEFT + COL // 2 + i * COL for i, p in enumerate(cols)}
    width = LEFT * 2 + COL * len(cols)
    height = TOP + HEAD + ROW * (len(msgs) + 1) + 10
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="DejaVu Sans, sans-serif" '
           'font-size="12">',
           '<defs><marker id="a" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="8" '
           'markerHeight="8" orient="auto"><path d="M0,0 L10,5 L0,10 z" fill="#222"/></marker>'
           '</defs>',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="{LEFT}" y="24" font-size="15" font-weight="bold">'
           f'{escape(title or operation)}</text>']
    bottom = height - 8
    for p in cols:
        cx = x[p]
        out.append(f'<line x1="{cx}" y1="{TOP + HEAD}" x2="{cx}" y2="{bottom}" stroke="#999" '
                   'stroke-dasharray="4,3"/>')
        out.append(f'<rect x="{cx - COL // 2 + 8}" y="{TOP}" width="{COL - 16}" height="{HEAD}" '
                   'rx="4" fill="#e8eef7" stroke="#4a6fa5"/>')
        out.append(f'<text x="{cx}" y="{TOP + HEAD // 2 + 4}" text-anchor="middle">'
                   f'{escape(p)}</text>')
    for i, (a, b, label) in enumerate(msgs):
        y = TOP + HEAD + ROW * (i + 1)
        if a == b:
            out.append(f'<rect x="{x[a] - 6}" y="{y - 14}" width="12" height="18" fill="#fff3c4" '
                       'stroke="#b08d00"/>')
            out.append(f'<text x="{x[a] + 12}" y="{y}" font-style="italic">{escape(label)}</text>')
            continue
        direction = 1 if x[b] > x[a] else -1
        out.append(f'<line x1="{x[a]}" y1="{y}" x2="{x[b] - 2 * direction}" y2="{y}" '
                   'stroke="#222" marker-end="url(#a)"/>')
        tx = min(x[a], x[b]) + 6
        out.append(f'<text x="{tx}" y="{y - 5}">{escape(label)}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"
