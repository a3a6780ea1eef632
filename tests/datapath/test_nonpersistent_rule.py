"""file-raw's URIs against the daemon's datapath choice: a non-persistent disk's
Datapath.open (epoch_begin, NONPERSISTENT schemes first) must go to the same plugin as its
attach, activate, deactivate, detach and close (the first URI), for every combination of
declared NONPERSISTENT support, of installed datapaths and of the SR's datapath setting."""

import itertools

import pytest

from xapi_storage.toolstack.daemon import choose
from xapi_storage.volume import file_raw

SETTINGS = [None, "blkback", "pyblkback", "blkback,pyblkback", "pyblkback,blkback"]


def combinations():
    """(registered {scheme: features}) for every subset of our datapaths installed and every
    choice of which of them declare NONPERSISTENT."""
    for n in range(len(file_raw.DATAPATHS) + 1):
        for installed in itertools.combinations(file_raw.DATAPATHS, n):
            for np in itertools.product([False, True], repeat=len(installed)):
                yield {s: (["NONPERSISTENT"] if d else []) for s, d in zip(installed, np)}


def splits(uris, registered):
    """True when the daemon would open (epoch_begin, persistent=false) through one plugin and
    attach/detach/close through another."""
    opened = choose(uris, registered, persistent=False)
    used = choose(uris, registered, persistent=True)
    return opened != used


def volume_uris(setting):
    config = {} if setting is None else {"datapath": setting}
    order = file_raw._config_datapath(config) or file_raw.DEFAULT_DATAPATH
    rec = {"key": "6f3b0000-0000-4000-8000-000000000001", "name": "", "description": "",
           "read_write": True, "sharable": False, "keys": {}}

    class St:
        st_mode = 0o100600
        st_size = 1 << 20
        st_blocks = 0
        st_nlink = 1        # a data file of ours alone (a hard-linked one gets no URI)
    return file_raw._volume("/srv/sr", order, rec, St())["uri"]


@pytest.mark.parametrize("setting", SETTINGS)
def test_file_raw_uris_never_split_open_from_attach(setting):
    uris = volume_uris(setting)
    assert len(uris) == 1
    for registered in combinations():
        assert not splits(uris, registered), (setting, registered, uris)


def test_the_check_sees_a_split_list():
    """The check itself can fail: the two-URI list file-raw used to answer splits as soon as
    the second scheme declares NONPERSISTENT and the first does not."""
    two = ["blkback:///srv/sr/v.img", "pyblkback:///srv/sr/v.img"]
    bad = [r for r in combinations() if splits(two, r)]
    assert bad == [{"blkback": [], "pyblkback": ["NONPERSISTENT"]}]
