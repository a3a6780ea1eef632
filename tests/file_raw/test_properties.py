"""Generated inputs: keys and SR keys are never paths; names and Volume.set pairs are data."""

import os

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from xapi_storage.sdk.errors import SR_does_not_exist, Volume_does_not_exist
from xapi_storage.volume import file_raw, store

from .conftest import DBG

pytestmark = pytest.mark.filterwarnings("ignore")
SETTINGS = settings(max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])
V, SR = file_raw.Volume(), file_raw.SR()

# text with the characters that matter for paths, plus anything else
path_text = st.text(alphabet=st.sampled_from("/.\x00%abc-0123456789ABCDEFé\ud800 "), max_size=50) \
    | st.text(max_size=40)


@SETTINGS
@given(key=path_text)
def test_any_non_uuid_key_is_no_volume(sr, sr_dir, key):
    before = sorted(os.listdir(sr_dir))
    if store.is_uuid(key):
        return
    for call in (lambda: V.stat(dbg=DBG, sr=sr, key=key),
                 lambda: V.set(dbg=DBG, sr=sr, key=key, k="k", v="v"),
                 lambda: V.snapshot(dbg=DBG, sr=sr, key=key),
                 lambda: V.destroy(dbg=DBG, sr=sr, key=key)):
        with pytest.raises(Volume_does_not_exist):
            call()
    assert sorted(os.listdir(sr_dir)) == before


@SETTINGS
@given(suffix=path_text)
def test_any_other_sr_key_is_no_sr(sr, suffix):
    other = sr + suffix
    if suffix == "" or file_raw.sr_path(sr) == (store.unquote_path(other[7:]) or ""):
        return
    with pytest.raises(SR_does_not_exist):
        SR.stat(dbg=DBG, sr=other)
    with pytest.raises(SR_does_not_exist):
        V.create(dbg=DBG, sr=other, name="", description="", size=0, sharable=False)


@SETTINGS
@given(path=st.text(min_size=1, max_size=30).map(lambda s: "/" + s))
def test_quote_round_trip(path):
    q = store.quote_path(path)
    assert store.unquote_path(q) == path
    assert all(c in store._SAFE_CHARS or c == "%" for c in q)


@SETTINGS
@given(pairs=st.dictionaries(st.text(max_size=20), st.text(max_size=20), max_size=8),
       name=st.text(max_size=30))
def test_keys_and_names_round_trip(sr, pairs, name):
    key = V.create(dbg=DBG, sr=sr, name=name, description=name, size=0, sharable=False)["key"]
    for k, v in pairs.items():
        V.set(dbg=DBG, sr=sr, key=key, k=k, v=v)
    got = V.stat(dbg=DBG, sr=sr, key=key)
    assert (got["keys"], got["name"], got["description"]) == (pairs, name, name)
    V.destroy(dbg=DBG, sr=sr, key=key)
