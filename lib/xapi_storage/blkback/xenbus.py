"""The backend's XenBus state machine, as data. No I/O.

The machine's state is the backend state we have written (XenbusState values, plus
DESTROYED once the device is gone for good). Inputs are events; the caller turns what it reads
from XenStore into events with `frontend_event()` / `backend_event()`. `TABLE[(state, event)]`
gives (next state, actions). The table is total: every state x every event has an entry
(tests/blkback check that), so a hostile or confused peer can only move us along listed edges.

Actions the caller performs, in order:
    PUBLISH    write the pre-InitWait keys (features, ring limits) with the new state (2)
    CONNECT    read the frontend's ring details, map rings, bind event channels; then feed
               CONNECTED or CONNECT_FAILED back in
    ANNOUNCE   write the connect-time keys (sectors, info, features) with the new state (4)
    DISCONNECT stop taking requests, unmap grants (persistent too) and rings, unbind ports
    DESTROY    the device is finished: close the storage, remove what we own

Every change of state is written to BE/state by the caller (inside a transaction that checks
the node still exists); entering DESTROYED writes Closed (6) if the node is still there.

One rule outside the table: entering CLOSED while `online` is 0 or a shutdown was asked
continues to DESTROYED (Linux unregisters only when online=0; QEMU likewise).
"""

UNKNOWN, INITIALISING, INITWAIT, INITIALISED, CONNECTED, CLOSING, CLOSED = range(7)
RECONFIGURING, RECONFIGURED = 7, 8
DESTROYED = -1

STATE_NAMES = {UNKNOWN: "Unknown", INITIALISING: "Initialising", INITWAIT: "InitWait",
               INITIALISED: "Initialised", CONNECTED: "Connected", CLOSING: "Closing",
               CLOSED: "Closed", RECONFIGURING: "Reconfiguring", RECONFIGURED: "Reconfigured",
               DESTROYED: "Destroyed"}

# events
START = "start"                         # device created, storage open
FE_INITIALISING = "fe-initialising"
FE_INITWAIT = "fe-initwait"             # not a frontend state; ignored
FE_INITIALISED = "fe-initialised"
FE_CONNECTED = "fe-connected"
FE_CLOSING = "fe-closing"
FE_CLOSED = "fe-closed"
FE_GONE = "fe-gone"                     # node absent, Unknown (0), or unparsable
FE_OTHER = "fe-other"                   # Reconfiguring/Reconfigured/out of range: ignored
TOOLSTACK_CLOSE_ACTIVE = "toolstack-close-active"   # someone else wrote BE state=5, FE active
TOOLSTACK_CLOSE_IDLE = "toolstack-close-idle"       # ... FE not in {2,3,4,5}
BE_GONE = "be-gone"                     # our backend directory was removed
OFFLINE = "offline"                     # BE online=0
CONNECTED_OK = "connected"              # CONNECT succeeded
CONNECT_FAILED = "connect-failed"       # bad ring ref, bind failure, unknown protocol
FATAL = "fatal"                         # the frontend broke the ring protocol, storage died
SHUTDOWN = "shutdown"                   # we want to stop (Ctrl-C, SIGTERM): polite close
FORCE = "force"                         # stop now (second Ctrl-C)

EVENTS = (START, FE_INITIALISING, FE_INITWAIT, FE_INITIALISED, FE_CONNECTED, FE_CLOSING,
          FE_CLOSED, FE_GONE, FE_OTHER, TOOLSTACK_CLOSE_ACTIVE, TOOLSTACK_CLOSE_IDLE, BE_GONE,
          OFFLINE, CONNECTED_OK, CONNECT_FAILED, FATAL, SHUTDOWN, FORCE)
STATES = (INITIALISING, INITWAIT, CONNECTED, CLOSING, CLOSED, DESTROYED)

PUBLISH = "publish"
CONNECT = "connect"
ANNOUNCE = "announce"
DISCONNECT = "disconnect"
DESTROY = "destroy"
ACTIONS = (PUBLISH, CONNECT, ANNOUNCE, DISCONNECT, DESTROY)

_ = ()


def _table():
    t = {}
    # Default for every pair: stay, do nothing. Then the edges that do something.
    for s in STATES:
        for e in EVENTS:
            t[(s, e)] = (s, _)
    # Anything that means "gone" destroys, from any live state.
    for s in (INITIALISING, INITWAIT, CONNECTED, CLOSING, CLOSED):
        t[(s, BE_GONE)] = (DESTROYED, (DISCONNECT, DESTROY))
        t[(s, FE_GONE)] = (DESTROYED, (DISCONNECT, DESTROY))
        t[(s, FORCE)] = (DESTROYED, (DISCONNECT, DESTROY))

    # 1 Initialising: the device exists but we have not offered it yet.
    t[(INITIALISING, START)] = (INITWAIT, (PUBLISH,))
    t[(INITIALISING, OFFLINE)] = (DESTROYED, (DESTROY,))
    t[(INITIALISING, SHUTDOWN)] = (DESTROYED, (DESTROY,))
    t[(INITIALISING, FATAL)] = (DESTROYED, (DESTROY,))
    t[(INITIALISING, TOOLSTACK_CLOSE_ACTIVE)] = (CLOSED, _)
    t[(INITIALISING, TOOLSTACK_CLOSE_IDLE)] = (CLOSED, _)

    # 2 InitWait: offered; waiting for the frontend's ring details.
    t[(INITWAIT, FE_INITIALISED)] = (INITWAIT, (CONNECT,))
    t[(INITWAIT, FE_CONNECTED)] = (INITWAIT, (CONNECT,))        # a missed watch
    t[(INITWAIT, CONNECTED_OK)] = (CONNECTED, (ANNOUNCE,))
    t[(INITWAIT, CONNECT_FAILED)] = (CLOSING, (DISCONNECT,))    # xenbus_dev_fatal
    t[(INITWAIT, FE_CLOSING)] = (CLOSING, _)
    t[(INITWAIT, FE_CLOSED)] = (CLOSED, _)
    t[(INITWAIT, TOOLSTACK_CLOSE_ACTIVE)] = (CLOSING, _)
    t[(INITWAIT, TOOLSTACK_CLOSE_IDLE)] = (CLOSED, _)
    t[(INITWAIT, OFFLINE)] = (DESTROYED, (DESTROY,))
    t[(INITWAIT, SHUTDOWN)] = (DESTROYED, (DESTROY,))
    t[(INITWAIT, FATAL)] = (CLOSING, (DISCONNECT,))

    # 4 Connected: serving.
    t[(CONNECTED, FE_CLOSING)] = (CLOSING, _)
    t[(CONNECTED, FE_CLOSED)] = (CLOSED, (DISCONNECT,))
    t[(CONNECTED, TOOLSTACK_CLOSE_ACTIVE)] = (CLOSING, _)
    t[(CONNECTED, TOOLSTACK_CLOSE_IDLE)] = (CLOSED, (DISCONNECT,))
    t[(CONNECTED, SHUTDOWN)] = (CLOSING, _)
    t[(CONNECTED, FATAL)] = (CLOSING, (DISCONNECT,))

    # 5 Closing: waiting for the frontend to close.
    t[(CLOSING, FE_CLOSED)] = (CLOSED, (DISCONNECT,))
    t[(CLOSING, TOOLSTACK_CLOSE_IDLE)] = (CLOSED, (DISCONNECT,))
    t[(CLOSING, FATAL)] = (CLOSING, (DISCONNECT,))

    # 6 Closed: a frontend coming back to Initialising is offered the device again.
    t[(CLOSED, FE_INITIALISING)] = (INITWAIT, (PUBLISH,))
    t[(CLOSED, OFFLINE)] = (DESTROYED, (DESTROY,))
    t[(CLOSED, SHUTDOWN)] = (DESTROYED, (DESTROY,))
    t[(CLOSED, FATAL)] = (DESTROYED, (DESTROY,))
    # DESTROYED is terminal: every event stays (defaults).
    # Whatever destroys also disconnects first (idempotent when nothing is connected).
    for k, (new, actions) in t.items():
        if DESTROY in actions and DISCONNECT not in actions:
            t[k] = (new, (DISCONNECT,) + actions)
    return t


TABLE = _table()


def frontend_event(value):
    """The event for a value read from FE/state (bytes/str, or None if the node is absent)."""
    try:
        s = int(value)
    except (TypeError, ValueError):
        return FE_GONE
    return {INITIALISING: FE_INITIALISING, INITWAIT: FE_INITWAIT,
            INITIALISED: FE_INITIALISED, CONNECTED: FE_CONNECTED, CLOSING: FE_CLOSING,
            CLOSED: FE_CLOSED, UNKNOWN: FE_GONE}.get(s, FE_OTHER)


def fe_active(fe_state):
    return fe_state in (INITWAIT, INITIALISED, CONNECTED, CLOSING)


class Machine:
    """Holds the state and the two facts the table needs from outside (online, shutdown)."""

    __slots__ = ("state", "fe_state", "online", "stopping", "history")

    def __init__(self):
        self.state = INITIALISING
        self.fe_state = UNKNOWN
        self.online = True
        self.stopping = False
        self.history = []

    def feed(self, event):
        """Apply `event`; return (old state, new state, actions)."""
        if event == OFFLINE:
            self.online = False
        elif event in (SHUTDOWN, FORCE):
            self.stopping = True
        old = self.state
        new, actions = TABLE[(old, event)]
        if new == CLOSED and (not self.online or self.stopping):
            new = DESTROYED
            actions = actions + tuple(a for a in (DISCONNECT, DESTROY) if a not in actions)
        self.state = new
        self.history.append((old, event, new))
        del self.history[:-32]
        return old, new, actions

    def on_frontend_state(self, value):
        try:
            self.fe_state = int(value)
        except (TypeError, ValueError):
            self.fe_state = UNKNOWN
        return self.feed(frontend_event(value))

    def on_backend_state(self, value):
        """Our BE/state node was written by someone else (the toolstack). None = removed."""
        if value is None:
            return self.feed(BE_GONE)
        try:
            s = int(value)
        except (TypeError, ValueError):
            return (self.state, self.state, ())
        if s == CLOSING and self.state != CLOSING:
            ev = TOOLSTACK_CLOSE_ACTIVE if fe_active(self.fe_state) else TOOLSTACK_CLOSE_IDLE
            return self.feed(ev)
        return (self.state, self.state, ())
