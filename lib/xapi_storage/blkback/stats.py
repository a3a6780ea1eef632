"""Per-device statistics, cheap to update from the hot loop and readable while it runs."""

import json
import os
import time

OPS = ("read", "write", "barrier", "flush", "other", "discard")
# latency histogram buckets: upper bounds in microseconds (the last is +inf)
LAT_BUCKETS_US = (10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 50000, 100000)


class Stats:
    """Counters for one device. The hot loop adds per batch, not per request."""

    def __init__(self):
        self.started = time.time()
        self.requests = [0] * 6             # by op: read write barrier flush (4 unused) discard
        self.sectors = [0] * 6              # 512-byte sectors moved, by op
        self.errors = 0                     # ERROR responses (bad requests, I/O errors)
        self.unsupported = 0                # EOPNOTSUPP responses
        self.indirect = 0                   # requests that came indirect
        self.batches = 0                    # wake-ups that found work
        self.notifies = 0                   # event-channel kicks sent
        self.ring_max = 0                   # most requests found on a ring at once
        self.ring_sum = 0                   # sum of requests per batch (mean = /batches)
        self.lat_sum_ns = 0                 # sum over requests of (batch end - batch start)
        self.lat_max_ns = 0
        self.lat_hist = [0] * (len(LAT_BUCKETS_US) + 1)
        self.persistent_grants = 0
        self.grant_maps = 0                 # map calls made (persistent and not)
        self.c_batched = 0                  # requests done by the C batch (_pio)
        self.state = "Initialising"
        self.sectors_size = 0

    def batch(self, n, dt_ns):
        self.batches += 1
        self.ring_sum += n
        if n > self.ring_max:
            self.ring_max = n
        self.lat_sum_ns += n * dt_ns
        if dt_ns > self.lat_max_ns:
            self.lat_max_ns = dt_ns
        us = dt_ns // 1000
        i = 0
        for b in LAT_BUCKETS_US:
            if us < b:
                break
            i += 1
        self.lat_hist[i] += n

    def as_dict(self):
        total = sum(self.requests)
        return {
            "state": self.state,
            "uptime_s": round(time.time() - self.started, 3),
            "size_sectors": self.sectors_size,
            "requests": {name: self.requests[i] for i, name in enumerate(OPS) if name != "other"},
            "bytes": {"read": self.sectors[0] * 512, "write": self.sectors[1] * 512
                      + self.sectors[2] * 512 + self.sectors[3] * 512,
                      "discard": self.sectors[5] * 512},
            "indirect_requests": self.indirect,
            "errors": self.errors,
            "unsupported": self.unsupported,
            "batches": self.batches,
            "notifies": self.notifies,
            "ring_occupancy": {"max": self.ring_max,
                               "mean": round(self.ring_sum / self.batches, 2)
                               if self.batches else 0.0},
            "latency_us": {"mean": round(self.lat_sum_ns / total / 1000, 2) if total else 0.0,
                           "max": round(self.lat_max_ns / 1000, 2),
                           "histogram": dict([(f"<{b}", c) for b, c in
                                              zip(LAT_BUCKETS_US, self.lat_hist)]
                                             + [("more", self.lat_hist[-1])])},
            "persistent_grants": self.persistent_grants,
            "grant_map_calls": self.grant_maps,
            "c_batched_requests": self.c_batched,
        }


def write_json_atomically(path, obj):
    """Replace `path` by a file holding `obj` as JSON, mode 0600 (statistics name the guest's
    devices and I/O pattern: for the operator only).

    The temporary file beside it has an unpredictable name and is created with O_EXCL, which
    never follows a symlink: as root, a link planted at a guessable name would otherwise have
    us overwrite its target once a second. rename() then replaces a symlink at `path` itself,
    never its target."""
    tmp = f"{path}.tmp.{os.urandom(6).hex()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1, sort_keys=True)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
