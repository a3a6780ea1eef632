"""A XenStore server, free of I/O: the tree, permissions, watches and transactions.

Semantics follow the C xenstored (tools/xenstored/core.c, docs/misc/xenstore.txt):

* a node has a value, children and a permission list; the first entry names the owner and
  the access of everyone not listed; dom0 (privileged) may do anything; the owner may do
  anything; otherwise an explicit entry for the domain, else the default;
* a missing node reads as ENOENT only if the caller could read (or write, for writes) the
  nearest existing ancestor, else EACCES, so that nothing leaks;
* a created node (and every missing parent) inherits its parent's permissions, and a node
  an unprivileged domain creates is owned by that domain;
* a watch fires once when set, then for every change at or below its path (and, on
  removal, for watches below the removed node), only to connections that may read the
  node; paths in events have the form the watch was set with (relative or absolute);
* a transaction works on a snapshot; at commit it fails with EAGAIN if any node it read
  or wrote was changed by someone else since; its changes fire watches only at commit.

The I/O side (sockets) lives in daemon.py: it calls `Server.connect()` per client and
`Connection.handle(type, req_id, tx_id, payload)` per message, and is given every message
to send through the `send(bytes)` callable passed at connect.
"""

import itertools
import logging

from .. import xs_wire as W

log = logging.getLogger(__name__)

PERM_NONE, PERM_READ, PERM_WRITE, PERM_BOTH = 0, 1, 2, 3
PERM_OWNER = 4
_LETTER = {"n": PERM_NONE, "r": PERM_READ, "w": PERM_WRITE, "b": PERM_BOTH}
_CHARS = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-/_@")
SPECIAL = (b"@introduceDomain", b"@releaseDomain")

# Quotas for unprivileged domains (xenstored's defaults).
QUOTA_NODES = 1000          # quota-nb-entry-per-domain
QUOTA_VALUE = 2048          # quota-max-entry-size
QUOTA_WATCHES = 128         # quota-nb-watch-per-domain
QUOTA_TRANSACTIONS = 10     # quota-max-transaction
MAX_TRANSACTIONS_DOM0 = 1000


class XsError(Exception):
    """A request failed; `name` is the errno name sent to the client."""

    def __init__(self, name):
        super().__init__(name)
        self.name = name


def perms_to_str(perms):
    return [("nrwb"[p] + str(d)) for p, d in perms]


def parse_perm(s):
    if len(s) < 2 or s[:1] not in ("n", "r", "w", "b") or not s[1:].isdigit():
        raise XsError("EINVAL")
    domid = int(s[1:])
    if domid > 0xFFFF:
        raise XsError("EINVAL")
    return (_LETTER[s[0]], domid)


class Node:
    """A node. Nodes are shared between the committed tree and transaction snapshots;
    a tree only changes nodes stamped with its own version, copying the others first."""

    __slots__ = ("value", "perms", "children", "gen", "ver")

    def __init__(self, value=b"", perms=((PERM_NONE, 0),), gen=0, ver=None):
        self.value = value
        self.perms = tuple(perms)
        self.children = {}
        self.gen = gen
        self.ver = ver

    def shallow(self, ver):
        n = Node(self.value, self.perms, self.gen, ver)
        n.children = dict(self.children)
        return n


def split(path):
    """'/a/b' -> ['a', 'b']; '/' -> []"""
    return [] if path == "/" else path[1:].split("/")


def parent_of(path):
    i = path.rfind("/")
    return "/" if i == 0 else path[:i]


def perm_for(perms, domid, privileged):
    if privileged:
        return PERM_BOTH | PERM_OWNER
    if perms[0][1] == domid:
        return PERM_BOTH | PERM_OWNER
    for p, d in perms[1:]:
        if d == domid:
            return p
    return perms[0][0]


class Tree:
    """The node tree with xenstored's access rules; one per store and per transaction."""

    def __init__(self, root=None):
        self.ver = object()
        self.root = root or Node(perms=((PERM_NONE, 0),), ver=self.ver)
        # paths this tree was asked about -> generation seen (None = absent); used by
        # transactions for conflict detection
        self.accessed = None

    def snapshot(self):
        """An independent copy in O(1): from now on both trees copy a node before they
        change it (path copying)."""
        self.ver = object()
        return Tree(self.root)

    def _writable(self, path):
        """The node at `path` (which exists), made private to this tree along with its
        ancestors."""
        ver = self.ver
        node = self.root
        if node.ver is not ver:
            node = self.root = node.shallow(ver)
        for name in split(path):
            child = node.children[name]
            if child.ver is not ver:
                child = node.children[name] = child.shallow(ver)
            node = child
        return node

    def _lookup(self, path):
        node = self.root
        for name in split(path):
            node = node.children.get(name)
            if node is None:
                return None
        return node

    def _note(self, path, node):
        if self.accessed is not None and path not in self.accessed:
            self.accessed[path] = None if node is None else node.gen

    def lookup(self, path):
        node = self._lookup(path)
        self._note(path, node)
        return node

    def get(self, ctx, path, perm):
        """The node at `path` if ctx has `perm` on it; else EACCES/ENOENT as xenstored."""
        node = self.lookup(path)
        if node is not None:
            if perm_for(node.perms, ctx.domid, ctx.privileged) & perm != perm:
                raise XsError("EACCES")
            return node
        # errno_from_parents: ENOENT only if the nearest existing ancestor allows `perm`
        p = path
        while p != "/":
            p = parent_of(p)
            anc = self.lookup(p)
            if anc is not None:
                if perm_for(anc.perms, ctx.domid, ctx.privileged) & perm:
                    raise XsError("ENOENT")
                raise XsError("EACCES")
        raise XsError("EACCES")

    # -- mutations: each returns the list of watch events as (path, perms, recurse)

    def _create(self, ctx, path, gen, store):
        """Create path and missing parents; return the new node."""
        parent_path = parent_of(path)
        parent = self.lookup(parent_path)
        if parent is None:
            parent = self._create(ctx, parent_path, gen, store)
        if not ctx.privileged and store.owned(ctx.domid) >= QUOTA_NODES:
            raise XsError("ENOSPC")
        perms = parent.perms
        if not ctx.privileged:
            perms = ((perms[0][0], ctx.domid),) + tuple(perms[1:])
        node = Node(b"", perms, gen, self.ver)
        parent = self._writable(parent_path)
        parent.children[path.rsplit("/", 1)[1]] = node
        parent.gen = gen
        store.owned_add(perms[0][1], 1)
        return node

    def write(self, ctx, path, value, gen, store):
        if not ctx.privileged and len(value) > QUOTA_VALUE:
            raise XsError("ENOSPC")
        try:
            node = self.get(ctx, path, PERM_WRITE)
        except XsError as e:
            if e.name != "ENOENT":
                raise
            node = self._create(ctx, path, gen, store)
        node = self._writable(path)
        node.value = value
        node.gen = gen
        return [(path, (node.perms,), False)]

    def mkdir(self, ctx, path, gen, store):
        try:
            self.get(ctx, path, PERM_WRITE)
            return []
        except XsError as e:
            if e.name != "ENOENT":
                raise
        node = self._create(ctx, path, gen, store)
        return [(path, (node.perms,), False)]

    def rm(self, ctx, path, gen, store):
        try:
            node = self.get(ctx, path, PERM_WRITE)
        except XsError as e:
            if e.name != "ENOENT":
                raise
            if self.lookup(parent_of(path)) is not None:
                return []
            raise
        if path == "/":
            raise XsError("EINVAL")
        self.lookup(parent_of(path))
        parent = self._writable(parent_of(path))
        del parent.children[path.rsplit("/", 1)[1]]
        parent.gen = gen

        def gone(n):
            store.owned_add(n.perms[0][1], -1)
            for c in n.children.values():
                gone(c)
        gone(node)
        return [(path, (node.perms,), True)]

    def set_perms(self, ctx, path, perms, gen, store):
        node = self.get(ctx, path, PERM_WRITE)
        if not ctx.privileged:
            if perm_for(node.perms, ctx.domid, False) & PERM_OWNER == 0:
                raise XsError("EACCES")
            if perms[0][1] != node.perms[0][1]:
                raise XsError("EPERM")       # unprivileged domains may not give nodes away
        store.owned_add(node.perms[0][1], -1)
        store.owned_add(perms[0][1], 1)
        old = node.perms
        node = self._writable(path)
        node.perms = tuple(perms)
        node.gen = gen
        # watchers that could read before or can read now hear about it
        return [(path, (old, node.perms), False)]


class Store:
    """The committed tree, the generation counter and per-domain node counts."""

    def __init__(self):
        self.tree = Tree()
        self.gen = 0
        self._owned = {0: 1}

    def next_gen(self):
        self.gen += 1
        return self.gen

    def owned(self, domid):
        return self._owned.get(domid, 0)

    def owned_add(self, domid, n):
        self._owned[domid] = self._owned.get(domid, 0) + n


class _NullCounter:
    def owned(self, domid):
        return 0

    def owned_add(self, domid, n):
        pass


class Transaction:
    def __init__(self, txid, store):
        self.id = txid
        self.tree = store.tree.snapshot()
        self.tree.accessed = {}
        self.ops = []      # (method name, args) replayed at commit


class Watch:
    __slots__ = ("path", "given", "token", "relative")

    def __init__(self, path, given, token, relative):
        self.path, self.given, self.token, self.relative = path, given, token, relative


class Connection:
    """One client connection, acting as `domid`."""

    def __init__(self, server, domid, send):
        self.server = server
        self.domid = domid
        self.privileged = domid == 0
        self.send = send
        self.watches = []
        self.transactions = {}
        self.closed = False
        self.home = f"/local/domain/{domid}"

    # -- helpers
    def reply(self, type_, req_id, tx_id, payload):
        self.send(W.pack(type_, req_id, tx_id, payload))

    def error(self, req_id, tx_id, name):
        self.reply(W.ERROR, req_id, tx_id, name.encode() + b"\0")

    def canonical(self, raw):
        """Validate a path from the wire and make it absolute (str)."""
        if not raw or any(c not in _CHARS for c in raw):
            raise XsError("EINVAL")
        s = raw.decode("ascii")
        if s.startswith("@"):
            raise XsError("EINVAL")
        if not s.startswith("/"):
            if len(s) > W.REL_PATH_MAX:
                raise XsError("EINVAL")
            s = self.home + "/" + s
        if (s.endswith("/") and s != "/") or "//" in s or len(s) > W.ABS_PATH_MAX:
            raise XsError("EINVAL")
        return s

    def close(self):
        if not self.closed:
            self.closed = True
            self.watches = []
            self.transactions = {}
            self.server.connections.discard(self)

    # -- dispatch
    def handle(self, type_, req_id, tx_id, payload):
        """Handle one request. Never raises for a client's mistake."""
        try:
            fn = _HANDLERS.get(type_)
            if fn is None:
                raise XsError("ENOSYS")
            fn(self, req_id, tx_id, payload)
        except XsError as e:
            self.error(req_id, tx_id, e.name)

    def _tree(self, tx_id):
        if tx_id == 0:
            return None, self.server.store.tree
        tx = self.transactions.get(tx_id)
        if tx is None:
            raise XsError("ENOENT")
        return tx, tx.tree

    def _mutate(self, tx_id, method, *args):
        tx, tree = self._tree(tx_id)
        if tx is None:
            store = self.server.store
            events = getattr(tree, method)(self, *args, store.next_gen(), store)
            self.server.fire(events)
        else:
            getattr(tree, method)(self, *args, 0, _NullCounter())
            tx.ops.append((method, args))

    def _onearg(self, payload):
        if not payload or payload.find(b"\0") != len(payload) - 1:
            raise XsError("EINVAL")
        return payload[:-1]

    def do_read(self, req_id, tx_id, payload):
        _, tree = self._tree(tx_id)
        node = tree.get(self, self.canonical(self._onearg(payload)), PERM_READ)
        self.reply(W.READ, req_id, tx_id, node.value)

    def do_directory(self, req_id, tx_id, payload):
        _, tree = self._tree(tx_id)
        node = tree.get(self, self.canonical(self._onearg(payload)), PERM_READ)
        body = b"".join(k.encode() + b"\0" for k in sorted(node.children))
        if len(body) > W.PAYLOAD_MAX:
            raise XsError("E2BIG")
        self.reply(W.DIRECTORY, req_id, tx_id, body)

    def do_directory_part(self, req_id, tx_id, payload):
        parts = payload.split(b"\0")
        if len(parts) != 3 or parts[2] != b"" or not parts[1].isdigit():
            raise XsError("EINVAL")
        _, tree = self._tree(tx_id)
        node = tree.get(self, self.canonical(parts[0]), PERM_READ)
        children = b"".join(k.encode() + b"\0" for k in sorted(node.children))
        off = int(parts[1])
        gen = str(node.gen).encode() + b"\0"
        if off >= len(children):
            self.reply(W.DIRECTORY_PART, req_id, tx_id, gen + b"\0")
            return
        room = W.PAYLOAD_MAX - len(gen) - 1
        chunk = children[off:]
        if len(chunk) <= room:
            body = gen + chunk + b"\0"
        else:
            cut = chunk.rfind(b"\0", 0, room) + 1
            body = gen + chunk[:cut]
        self.reply(W.DIRECTORY_PART, req_id, tx_id, body)

    def do_get_perms(self, req_id, tx_id, payload):
        _, tree = self._tree(tx_id)
        node = tree.get(self, self.canonical(self._onearg(payload)), PERM_READ)
        self.reply(W.GET_PERMS, req_id, tx_id,
                   b"".join(p.encode() + b"\0" for p in perms_to_str(node.perms)))

    def do_write(self, req_id, tx_id, payload):
        i = payload.find(b"\0")
        if i < 0:
            raise XsError("EINVAL")
        self._mutate(tx_id, "write", self.canonical(payload[:i]), payload[i + 1:])
        self.reply(W.WRITE, req_id, tx_id, b"OK\0")

    def do_mkdir(self, req_id, tx_id, payload):
        self._mutate(tx_id, "mkdir", self.canonical(self._onearg(payload)))
        self.reply(W.MKDIR, req_id, tx_id, b"OK\0")

    def do_rm(self, req_id, tx_id, payload):
        self._mutate(tx_id, "rm", self.canonical(self._onearg(payload)))
        self.reply(W.RM, req_id, tx_id, b"OK\0")

    def do_set_perms(self, req_id, tx_id, payload):
        if not payload.endswith(b"\0"):
            raise XsError("EINVAL")
        parts = payload[:-1].split(b"\0")
        if len(parts) < 2:
            raise XsError("EINVAL")
        try:
            perms = [parse_perm(p.decode("ascii")) for p in parts[1:]]
        except UnicodeDecodeError:
            raise XsError("EINVAL") from None
        self._mutate(tx_id, "set_perms", self.canonical(parts[0]), perms)
        self.reply(W.SET_PERMS, req_id, tx_id, b"OK\0")

    def _watch_args(self, payload):
        parts = payload.split(b"\0")
        if len(parts) != 3 or parts[2] != b"":
            raise XsError("EINVAL")
        raw, token = parts[0], parts[1]
        if raw in SPECIAL:
            return raw.decode(), raw, token, False
        return self.canonical(raw), raw, token, not raw.startswith(b"/")

    def do_watch(self, req_id, tx_id, payload):
        path, given, token, rel = self._watch_args(payload)
        for w in self.watches:
            if w.given == given and w.token == token:
                raise XsError("EEXIST")
        if not self.privileged and len(self.watches) >= QUOTA_WATCHES:
            raise XsError("E2BIG")
        self.watches.append(Watch(path, given, token, rel))
        self.reply(W.WATCH, req_id, tx_id, b"OK\0")
        # a watch fires once when it is set
        self.reply(W.WATCH_EVENT, 0, 0, given + b"\0" + token + b"\0")

    def do_unwatch(self, req_id, tx_id, payload):
        path, given, token, rel = self._watch_args(payload)
        for i, w in enumerate(self.watches):
            if w.path == path and w.token == token:
                del self.watches[i]
                self.reply(W.UNWATCH, req_id, tx_id, b"OK\0")
                return
        raise XsError("ENOENT")

    def do_reset_watches(self, req_id, tx_id, payload):
        self.watches = []
        self.reply(W.RESET_WATCHES, req_id, tx_id, b"OK\0")

    def do_transaction_start(self, req_id, tx_id, payload):
        if tx_id != 0:
            raise XsError("EBUSY")
        limit = MAX_TRANSACTIONS_DOM0 if self.privileged else QUOTA_TRANSACTIONS
        if len(self.transactions) >= limit:
            raise XsError("ENOSPC")
        txid = self.server.new_txid()
        self.transactions[txid] = Transaction(txid, self.server.store)
        self.reply(W.TRANSACTION_START, req_id, tx_id, str(txid).encode() + b"\0")

    def do_transaction_end(self, req_id, tx_id, payload):
        arg = self._onearg(payload)
        if arg not in (b"T", b"F"):
            raise XsError("EINVAL")
        tx = self.transactions.pop(tx_id, None)
        if tx is None:
            raise XsError("ENOENT")
        if arg == b"T":
            self.server.commit(self, tx)
        self.reply(W.TRANSACTION_END, req_id, tx_id, b"OK\0")

    def do_get_domain_path(self, req_id, tx_id, payload):
        arg = self._onearg(payload)
        if not arg.isdigit():
            raise XsError("EINVAL")
        self.reply(W.GET_DOMAIN_PATH, req_id, tx_id,
                   f"/local/domain/{int(arg)}".encode() + b"\0")

    def _domid_arg(self, payload, nargs):
        if not payload.endswith(b"\0"):
            raise XsError("EINVAL")
        parts = payload[:-1].split(b"\0")
        if len(parts) != nargs or not all(p.isdigit() for p in parts):
            raise XsError("EINVAL")
        return [int(p) for p in parts]

    def do_introduce(self, req_id, tx_id, payload):
        if not self.privileged:
            raise XsError("EACCES")
        domid = self._domid_arg(payload, 3)[0]
        if domid == 0 or domid >= 0x7FF0:
            raise XsError("EINVAL")
        self.server.introduce(domid)
        self.reply(W.INTRODUCE, req_id, tx_id, b"OK\0")

    def do_release(self, req_id, tx_id, payload):
        if not self.privileged:
            raise XsError("EACCES")
        domid = self._domid_arg(payload, 1)[0]
        self.server.release(domid)
        self.reply(W.RELEASE, req_id, tx_id, b"OK\0")

    def do_is_domain_introduced(self, req_id, tx_id, payload):
        domid = self._domid_arg(payload, 1)[0]
        yes = domid == 0 or domid in self.server.introduced
        self.reply(W.IS_DOMAIN_INTRODUCED, req_id, tx_id, b"T\0" if yes else b"F\0")

    def do_resume(self, req_id, tx_id, payload):
        if not self.privileged:
            raise XsError("EACCES")
        domid = self._domid_arg(payload, 1)[0]
        if domid not in self.server.introduced:
            raise XsError("ENOENT")
        self.reply(W.RESUME, req_id, tx_id, b"OK\0")

    def do_set_target(self, req_id, tx_id, payload):
        if not self.privileged:
            raise XsError("EACCES")
        self._domid_arg(payload, 2)
        self.reply(W.SET_TARGET, req_id, tx_id, b"OK\0")


_HANDLERS = {
    W.READ: Connection.do_read,
    W.DIRECTORY: Connection.do_directory,
    W.DIRECTORY_PART: Connection.do_directory_part,
    W.GET_PERMS: Connection.do_get_perms,
    W.WRITE: Connection.do_write,
    W.MKDIR: Connection.do_mkdir,
    W.RM: Connection.do_rm,
    W.SET_PERMS: Connection.do_set_perms,
    W.WATCH: Connection.do_watch,
    W.UNWATCH: Connection.do_unwatch,
    W.RESET_WATCHES: Connection.do_reset_watches,
    W.TRANSACTION_START: Connection.do_transaction_start,
    W.TRANSACTION_END: Connection.do_transaction_end,
    W.GET_DOMAIN_PATH: Connection.do_get_domain_path,
    W.INTRODUCE: Connection.do_introduce,
    W.RELEASE: Connection.do_release,
    W.IS_DOMAIN_INTRODUCED: Connection.do_is_domain_introduced,
    W.RESUME: Connection.do_resume,
    W.SET_TARGET: Connection.do_set_target,
}


class _Ctx:
    def __init__(self, domid):
        self.domid = domid
        self.privileged = domid == 0


DOM0 = _Ctx(0)


class Server:
    """The whole XenStore: the store, the connections, domain introduction."""

    def __init__(self, on_introduce=None, on_release=None):
        self.store = Store()
        self.connections = set()
        self.introduced = set()
        self._txids = itertools.count(1)
        self.on_introduce = on_introduce      # called with domid (daemon: create socket)
        self.on_release = on_release          # called with domid (daemon: drop socket)
        t, g = self.store.tree, self.store.next_gen()
        for path in ("/local/domain/0", "/tool/xenstored"):
            t.mkdir(DOM0, path, g, self.store)
        t.write(DOM0, "/local/domain/0/name", b"Domain-0", g, self.store)
        t.write(DOM0, "/local/domain/0/domid", b"0", g, self.store)

    def connect(self, domid, send):
        conn = Connection(self, domid, send)
        self.connections.add(conn)
        return conn

    def new_txid(self):
        while True:
            t = next(self._txids) & 0xFFFFFFFF
            if t:
                return t

    # -- direct access for the daemon (acts as dom0, fires watches)
    def op(self, method, path, *args, ctx=DOM0):
        store = self.store
        events = getattr(store.tree, method)(ctx, path, *args, store.next_gen(), store)
        self.fire(events)

    def read(self, path):
        node = self.store.tree._lookup(path)
        return None if node is None else node.value

    def commit(self, conn, tx):
        store = self.store
        for path, gen in tx.tree.accessed.items():
            node = store.tree._lookup(path)
            if (None if node is None else node.gen) != gen:
                raise XsError("EAGAIN")
        if not tx.ops:
            return
        # replay on a copy; swap it in only if every op succeeds
        scratch = store.tree.snapshot()
        owned = dict(store._owned)
        gen = store.next_gen()
        events = []
        try:
            for method, args in tx.ops:
                events += getattr(scratch, method)(conn, *args, gen, store)
        except XsError:
            store._owned = owned
            raise XsError("EAGAIN") from None
        store.tree = scratch
        self.fire(events)

    def fire(self, events):
        for path, perms, how in events:
            for conn in list(self.connections):
                for w in conn.watches:
                    if path == w.path or path.startswith(w.path + "/") or w.path == "/":
                        evpath = path
                    elif how and w.path.startswith(path + "/"):
                        evpath = w.path
                    else:
                        continue
                    if not conn.privileged and not self._may_read(conn, perms):
                        continue
                    if w.relative:
                        evpath = evpath[len(conn.home) + 1:] if evpath.startswith(
                            conn.home + "/") else evpath
                    conn.reply(W.WATCH_EVENT, 0, 0,
                               evpath.encode() + b"\0" + w.token + b"\0")

    @staticmethod
    def _may_read(conn, perm_lists):
        # set_perms passes the old and the new list: readable under either is enough
        return any(perm_for(pl, conn.domid, False) & PERM_READ for pl in perm_lists)

    def fire_special(self, name):
        for conn in list(self.connections):
            if not conn.privileged:
                continue
            for w in conn.watches:
                if w.path == name:
                    conn.reply(W.WATCH_EVENT, 0, 0, name.encode() + b"\0" + w.token + b"\0")

    def introduce(self, domid):
        if domid in self.introduced:
            return
        if self.on_introduce:
            self.on_introduce(domid)
        self.introduced.add(domid)
        self.fire_special("@introduceDomain")

    def release(self, domid):
        if domid not in self.introduced:
            raise XsError("ENOENT")
        self.introduced.discard(domid)
        for conn in list(self.connections):
            if conn.domid == domid:
                conn.close()
        if self.on_release:
            self.on_release(domid)
        self.fire_special("@releaseDomain")
