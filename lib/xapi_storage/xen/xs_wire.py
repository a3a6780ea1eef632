"""The XenStore wire format (xen/include/public/io/xs_wire.h), free of I/O.

A message is a 16-byte header `struct xsd_sockmsg {u32 type, req_id, tx_id, len}` in host
(little-endian on x86/Arm) byte order, followed by `len` (<= 4096) bytes of payload.
"""

import struct

HEADER = struct.Struct("<IIII")
PAYLOAD_MAX = 4096          # XENSTORE_PAYLOAD_MAX
ABS_PATH_MAX = 3072         # XENSTORE_ABS_PATH_MAX
REL_PATH_MAX = 2048         # XENSTORE_REL_PATH_MAX

CONTROL = 0                 # XS_CONTROL (formerly XS_DEBUG)
DIRECTORY = 1
READ = 2
GET_PERMS = 3
WATCH = 4
UNWATCH = 5
TRANSACTION_START = 6
TRANSACTION_END = 7
INTRODUCE = 8
RELEASE = 9
GET_DOMAIN_PATH = 10
WRITE = 11
MKDIR = 12
RM = 13
SET_PERMS = 14
WATCH_EVENT = 15
ERROR = 16
IS_DOMAIN_INTRODUCED = 17
RESUME = 18
SET_TARGET = 19
RESET_WATCHES = 21
DIRECTORY_PART = 22

NAMES = {v: k for k, v in dict(globals()).items()
         if isinstance(v, int) and k.isupper() and k not in (
             "PAYLOAD_MAX", "ABS_PATH_MAX", "REL_PATH_MAX")}

# The error names xenstored sends (xsd_errors[] in xs_wire.h), payload "NAME\0".
ERRORS = ("EINVAL", "EACCES", "EEXIST", "EISDIR", "ENOENT", "ENOMEM", "ENOSPC", "EIO",
          "ENOTEMPTY", "ENOSYS", "EROFS", "EBUSY", "EAGAIN", "EISCONN", "E2BIG", "EPERM")


def pack(type_, req_id, tx_id, payload):
    return HEADER.pack(type_, req_id, tx_id, len(payload)) + payload
