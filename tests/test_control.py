"""The mount's control requests, both ends, without a mount: what is accepted, refused and answered.

decode reads a line a local process sent; it must refuse anything that is
not a well-formed request before the mount acts on it. answer runs a request
on a Logbook; tests/test_mount.py checks the same over a real mount's socket.
"""

import json
import os

import pytest

from vml import control
from vml.control import Close, Save, Status
from vml.entries.save import save_source
from vml.errors import UsageError
from vml.layout import MEMORY_FILE, memory_state
from vml.view.logbook import Logbook
from vml.vms import areas

from helpers import registered

CS = 4096


@pytest.mark.parametrize("req", [Status(), Save("w", "e2", "msg", True, ("old.img",)), Close("w", discard=True)])
def test_a_request_survives_the_line(req):
    line = control.encode(req)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert control.decode(line) == req


@pytest.mark.parametrize(
    "doc, error",
    [
        ({"op": "format"}, "unknown request 'format'"),
        ([1, 2], "unknown request"),
        ({"op": "close", "area": "w", "path": "/etc"}, "unknown fields \\['path'\\]"),
        ({"op": "save", "area": 3, "entry": "e"}, "'area' must be a string"),
        ({"op": "close", "area": "w", "discard": "yes"}, "'discard' must be true or false"),
        ({"op": "save", "area": "w", "entry": "e", "drop": "disk.img"}, "'drop' must be a list"),
        ({"op": "save", "area": "w", "entry": "e", "drop": [1]}, "'drop' must be a list"),
        ({"op": "close", "area": "../../etc"}, "area"),
        ({"op": "save", "area": "w", "entry": "e", "hardware": {"memory_mib": "lots"}}, "memory"),
        ({"op": "save", "area": "w", "entry": "e", "hardware": [1]}, "not a JSON object"),
    ],
)
def test_a_malformed_request_is_refused(doc, error):
    with pytest.raises((ValueError, TypeError, UsageError), match=error):
        control.decode(json.dumps(doc).encode())


def test_a_request_too_long_or_too_deep_is_refused():
    with pytest.raises(ValueError, match="too long"):
        control.decode(b'{"op": "status", "x": "' + b"a" * control.REQUEST_LIMIT + b'"}')
    deep = b"[" * 30_000 + b"]" * 30_000  # within the limit, deeper than the parser goes
    reply, closed = control.answer(None, deep)  # refused before the logbook is touched
    assert reply["status"] == 2 and reply["error"].startswith("bad request") and closed is None


def test_the_mount_saves_no_file_but_the_areas_own_memory_state(home):
    req = control.save_request(home, "w", "e2", "", {MEMORY_FILE: memory_state(home, "w")}, (), None)
    assert req.memory
    for files in ({MEMORY_FILE: home / "elsewhere"}, {"notes.txt": memory_state(home, "w")}):
        with pytest.raises(UsageError, match=f"only {MEMORY_FILE}"):
            control.save_request(home, "w", "e2", "", files, (), None)


@pytest.fixture
def served(home, tmp_path):
    """A Logbook serving area "w" on entry e1, with one block written."""
    repo = registered(home, tmp_path / "rep")
    vm = tmp_path / "vm"
    vm.mkdir()
    (vm / "disk.img").write_bytes(os.urandom(8 * CS))
    save_source(repo, "e1", vm)
    areas.create_area(home, "w", repo, repo.entry("e1"))
    book = Logbook(home)
    handle = book.open(("areas", "w", "disk.img"), write=True)
    handle.write(CS, b"changed")
    handle.release()
    yield book, repo
    book.close()


def test_answer_runs_requests_on_the_logbook_and_reports_refusals(served):
    book, repo = served
    reply, closed = control.answer(book, control.encode(Status()))
    assert reply["ok"] and reply["areas"] == ["w"] and reply["pid"] == os.getpid() and closed is None
    reply, closed = control.answer(book, b"not json\n")
    assert reply == {"ok": False, "error": reply["error"], "status": 2} and reply["error"].startswith("bad request")
    reply, closed = control.answer(book, control.encode(Close("w")))
    assert not reply["ok"] and "unsaved changes" in reply["error"] and closed is None
    assert book.open_areas() == ["w"]  # refused: still served
    reply, closed = control.answer(book, control.encode(Save("w", "e1")))
    assert not reply["ok"] and "already exists" in reply["error"] and reply["status"] != 0
    reply, closed = control.answer(book, control.encode(Save("w", "e2", "from the mount")))
    assert reply["ok"] and reply["entry"] == "e2" and bytes.fromhex(reply["manifest"]) == repo.refs()["e2"]
    assert repo.entry("e2").manifest.message == "from the mount"
    reply, closed = control.answer(book, control.encode(Close("w")))
    assert reply == {"ok": True} and closed == "w" and book.open_areas() == []
    reply, closed = control.answer(book, control.encode(Close("w")))
    assert not reply["ok"] and "w" in reply["error"]
