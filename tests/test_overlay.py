"""Overlays on their own: the copy-on-write layers of an area's disk, over any base that reads.

An overlay's base is anything with ``size``, ``read`` and ``allocated``
(an entry's DiskReader, or a frozen overlay); here it is a bytes object, so
these tests check the layering, the block marks and what a reopened file
says, without a repository.
"""

import itertools
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vml.errors import DiskFull
from vml.vms.overlay import Blocks, Overlay, check_sparse_files

BLOCK = 4096


class Base:
    """A read-only disk in memory: what an overlay expects below it."""

    def __init__(self, data: bytes):
        self.data, self.size = data, len(data)

    def read(self, offset: int, size: int) -> bytes:
        return self.data[offset : offset + size]

    def allocated(self) -> int:
        return self.size


@settings(max_examples=200, deadline=None)
@given(ops=st.lists(st.tuples(st.booleans(), st.integers(0, 3 * Blocks.PAGE), st.integers(1, 2 * Blocks.PAGE))))
def test_blocks_behave_as_one_byte_a_block(ops):
    blocks, model = Blocks(), bytearray(6 * Blocks.PAGE)
    for add, start, length in ops:
        if add:
            blocks.add(start, start + length)
            model[start : start + length] = b"\1" * length
        else:  # a rescan of [start, start + length) that finds every other run of 7 blocks written
            found = [(b, min(b + 7, start + length)) for b in range(start, start + length, 14)]
            blocks.replace(start, start + length, found)
            model[start : start + length] = bytes(length)
            for s, e in found:
                model[s:e] = b"\1" * (e - s)
    assert blocks.count() == model.count(1)
    pieces = blocks.between(0, len(model))
    assert b"".join((b"\1" if m else b"\0") * (e - s) for s, e, m in pieces) == bytes(model)
    assert all(a[2] != b[2] for a, b in itertools.pairwise(pieces))  # neighbours joined
    assert len(blocks.pages) <= sum(1 for p in range(6) if 1 in model[p * Blocks.PAGE : (p + 1) * Blocks.PAGE])


writes = st.lists(
    st.tuples(st.integers(0, 2), st.integers(0, 16 * BLOCK - 1), st.binary(min_size=1, max_size=3 * BLOCK)),
    max_size=12,
)


@settings(max_examples=60, deadline=None)
@given(ops=writes)
def test_stacked_layers_read_as_the_writes_made_in_order_and_reopen_the_same(tmp_path_factory, ops):
    """Writes go to the top layer of three; a read, and a reopen from the files alone, agree with a model."""
    d = tmp_path_factory.mktemp("layers")
    base = Base(os.urandom(16 * BLOCK))
    model = bytearray(base.data)
    layers = [Overlay(d / "0", base, BLOCK)]
    for layer, offset, data in ops:
        while len(layers) <= layer:  # a save freezes the top layer and starts a new one on it
            layers.append(Overlay(d / str(len(layers)), layers[-1], BLOCK))
        data = data[: len(model) - offset]
        layers[-1].write(offset, data)
        model[offset : offset + len(data)] = data
    top = layers[-1]
    assert top.read(0, top.size) == bytes(model)
    reopened = Overlay(d / "0", base, BLOCK)
    for n in range(1, len(layers)):
        reopened = Overlay(d / str(n), reopened, BLOCK)
    assert reopened.read(0, top.size) == bytes(model)
    assert [layer.changed_blocks() for layer in reopened.layers()] == [layer.changed_blocks() for layer in top.layers()]


def test_a_partial_write_fills_its_block_from_below_and_marks_only_what_it_touched(tmp_path):
    base = Base(os.urandom(8 * BLOCK))
    top = Overlay(tmp_path / "o", base, BLOCK)
    top.write(2 * BLOCK + 100, b"x" * 10)
    assert top.changed_blocks() == 1 and top.dirty_chunks(4 * BLOCK) == {0}
    with open(tmp_path / "o", "rb") as f:
        f.seek(2 * BLOCK)
        block = f.read(BLOCK)
    assert block == base.data[2 * BLOCK : 2 * BLOCK + 100] + b"x" * 10 + base.data[2 * BLOCK + 110 : 3 * BLOCK]
    top.write(5 * BLOCK - 1, b"yz")  # across a block and a chunk boundary
    assert top.changed_blocks() == 3 and top.dirty_chunks(4 * BLOCK) == {0, 1}
    expected = base.data[5 * BLOCK - 2 : 5 * BLOCK - 1] + b"yz" + base.data[5 * BLOCK + 1 : 5 * BLOCK + 2]
    assert top.read(5 * BLOCK - 2, 4) == expected


def test_a_write_past_the_end_of_the_disk_is_refused_and_changes_nothing(tmp_path):
    base = Base(bytes(4 * BLOCK))
    top = Overlay(tmp_path / "o", base, BLOCK)
    with pytest.raises(DiskFull, match="past the end"):
        top.write(4 * BLOCK - 2, b"abc")
    assert top.changed_blocks() == 0 and top.read(0, top.size) == bytes(4 * BLOCK)


def test_sync_flushes_the_frozen_layers_below(tmp_path, monkeypatch):
    lower = Overlay(tmp_path / "a", Base(bytes(4 * BLOCK)), BLOCK)
    top = Overlay(tmp_path / "b", lower, BLOCK)
    synced = []
    real = os.fdatasync
    monkeypatch.setattr(os, "fdatasync", lambda fd: (synced.append(fd), real(fd)))
    top.sync()
    assert sorted(synced) == sorted([lower.fd, top.fd])


def test_the_home_file_system_must_keep_sparse_files(tmp_path):
    check_sparse_files(tmp_path, BLOCK)  # the test's own file system (ext4, xfs or tmpfs) does
    assert not list(tmp_path.iterdir())  # and the probe is gone
