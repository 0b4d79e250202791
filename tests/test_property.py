"""Properties: chains of random writes round-trip; chunk tables; rm --reparent keeps entries whole."""

import shutil
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vml.entries.checkout import checkout
from vml.entries.maintenance import remove, verify
from vml.entries.save import save_source
from vml.repo.chunkmap import ChunkTable
from vml.repo.objects import HOLE
from vml.repo.repository import Repository
from vml.repo.store import Store

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
        # Declared raw: the data is random, and may start like another format's header
        # (Hypothesis tries the magic strings it finds in vml, cloop's among them).
        save_source(repo, "e0", src, fmt="raw")
        versions = {"e0": initial}
        for n, (kind, pick, writes, size) in enumerate(steps, start=1):
            parent = sorted(versions)[pick % len(versions)]
            data = apply(versions[parent], writes, size)
            src.write_bytes(data)
            save_source(repo, f"e{n}", src, parent=parent, kind=kind, fmt="raw")
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


# -- chunk tables: the sparse table against a plain dict ------------------------

record = st.tuples(st.integers(0, 40), st.sampled_from([HOLE, *(bytes([i]) * 32 for i in range(1, 5))]))
table_op = st.one_of(
    st.tuples(st.just("apply"), st.lists(record, max_size=12)),
    st.tuples(st.just("resize"), st.integers(0, 41 * 7)),
)


@settings(max_examples=300, deadline=None)
@given(size=st.integers(0, 41 * 7), ops=st.lists(table_op, max_size=10), ref_ops=st.lists(table_op, max_size=4))
def test_the_sparse_chunk_table_behaves_as_a_dense_one(size, ops, ref_ops):
    def run(ops, size):
        table, model = ChunkTable(size, 7), {}
        for op, arg in ops:
            if op == "apply":
                recs = sorted({i: (i, d, i + 1) for i, d in arg if i < table.count}.values())
                table.apply(recs)
                for i, d, c in recs:
                    if d == HOLE:
                        model.pop(i, None)
                    else:
                        model[i] = (d, c)
            else:
                table.resize(arg)
                model = {i: v for i, v in model.items() if i < table.count}
            assert [(i, d, c) for i, d, c in table.records()] == [(i, *model[i]) for i in sorted(model)]
            assert all(table.digest(i) == model.get(i, (HOLE,))[0] for i in range(table.count + 2))
            assert table.allocated() == sum(table.chunk_length(i) for i in model)
            assert len(table) == len(model) and table.digest_set() == {d for d, _ in model.values()}
        return table

    table, ref = run(ops, size), run(ref_ops, size)
    # The diff turns the reference, resized, into the table: exactly what a delta map stores.
    rebuilt = ref.copy()
    rebuilt.resize(table.size)
    rebuilt.apply(list(table.diff(ref)))
    assert list(rebuilt.records()) == list(table.records())
    assert list(table.diff(table.copy())) == []


# -- rm --reparent keeps every field of the entries it rewrites ------------------


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    kinds=st.lists(st.sampled_from(["incremental", "differential", "full"]), min_size=2, max_size=4),
    memory=st.integers(64, 8192),
    vcpus=st.integers(1, 16),
    message=st.text(max_size=30),
    victim=st.integers(0, 3),
)
def test_rm_reparent_changes_only_links_and_deltas(kinds, memory, vcpus, message, victim):
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        repo = Repository(Store.create(tmp / "repo", chunk_size=CS))
        vm = tmp / "vm"
        vm.mkdir()
        (vm / "vm.xml").write_text(
            f"<domain type='kvm'><name>v</name><memory unit='MiB'>{memory}</memory><vcpu>{vcpus}</vcpu>"
            "<devices><disk type='file' device='disk'><source file='disk.img'/><target dev='vda' bus='virtio'/>"
            "</disk></devices></domain>\n"
        )
        disk = bytearray(6 * CS)
        save_source(repo, "h0", vm_with(vm, disk), message=message)
        for n, kind in enumerate(kinds, start=1):
            disk[n * CS : n * CS + 10] = bytes([n]) * 10
            (vm / "notes.txt").write_text(f"step {n}\n" * n)
            save_source(repo, f"h{n}", vm_with(vm, disk), parent=f"h{n - 1}", kind=kind, message=f"{message} {n}")
        before = {e.name: e.manifest for e in repo.entries()}
        gone = f"h{victim % len(kinds)}"
        rewritten = remove(repo, gone, reparent=True)["rewritten"]
        assert rewritten, "a middle entry always has dependents"
        for name in rewritten:
            old, new = before[name], repo.entry(name).manifest
            assert new.hardware is not None and new.hardware.memory_mib == memory
            unchanged = ("name", "created", "chunk_size", "message", "hardware", "extra")
            assert {f: getattr(new, f) for f in unchanged} == {f: getattr(old, f) for f in unchanged}
            assert [(s.name, s.size, s.mode) for s in new.disks + new.files] == [
                (s.name, s.size, s.mode) for s in old.disks + old.files
            ]
        assert verify(repo) == []


def vm_with(vm: Path, disk: bytearray) -> Path:
    (vm / "disk.img").write_bytes(disk)
    return vm
