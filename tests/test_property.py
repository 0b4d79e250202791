"""Property: random writes to a parent image, saved as any kind of entry, check out byte for byte."""

import shutil
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vml.checkout import checkout
from vml.maintenance import remove, verify
from vml.repository import Repository
from vml.save import save
from vml.store import Store

CS = 4096

write_op = st.tuples(
    st.integers(0, 24 * CS),  # offset
    st.one_of(
        st.binary(min_size=1, max_size=3 * CS),
        st.integers(1, 3 * CS).map(bytes),  # zeros: punches "holes" into data
        st.tuples(st.integers(0, 255), st.integers(1, 2 * CS)).map(lambda t: bytes([t[0]]) * t[1]),
    ),
)
step = st.tuples(
    st.sampled_from(["full", "incremental", "differential"]),
    st.integers(0, 100),  # which earlier entry is the parent (modulo)
    st.lists(write_op, max_size=6),
    st.one_of(st.none(), st.integers(0, 26 * CS)),  # truncate to this size
)


def apply(data: bytes, writes, size) -> bytes:
    buf = bytearray(data)
    for off, chunk in writes:
        if len(buf) < off:
            buf.extend(bytes(off - len(buf)))
        buf[off : off + len(chunk)] = chunk
    if size is not None:
        buf = buf[:size] + bytes(max(0, size - len(buf)))
    return bytes(buf)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(initial=st.binary(max_size=8 * CS), steps=st.lists(step, min_size=1, max_size=6))
def test_chains_of_random_writes_round_trip(initial, steps):
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        repo = Repository(Store.create(tmp / "repo", chunk_size=CS))
        src = tmp / "disk.img"
        src.write_bytes(initial)
        save(repo, "e0", src)
        versions = {"e0": initial}
        for n, (kind, pick, writes, size) in enumerate(steps, start=1):
            parent = sorted(versions)[pick % len(versions)]
            data = apply(versions[parent], writes, size)
            src.write_bytes(data)
            save(repo, f"e{n}", src, parent=parent, kind=kind)
            versions[f"e{n}"] = data
        for name, data in versions.items():
            out = tmp / f"out-{name}"
            checkout(repo, name, out)
            assert (out / "disk.img").read_bytes() == data, name
            shutil.rmtree(out)
        # Removing a middle entry must not change what any other entry holds.
        victim = sorted(versions)[len(versions) // 2]
        remove(repo, victim, reparent=True)
        del versions[victim]
        for name, data in versions.items():
            out = tmp / f"after-{name}"
            checkout(repo, name, out)
            assert (out / "disk.img").read_bytes() == data, name
        assert verify(repo) == []
