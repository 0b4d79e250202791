"""Environment backups without images: restic's pattern rules, login files read as text, hostile index records."""

import json

import pytest

from vml.entries import envtree
from vml.entries.envtree import Record
from vml.envs import loginenv
from vml.envs.patterns import Filter, matches, read_file
from vml.errors import CorruptManifest, UsageError


@pytest.mark.parametrize(
    ("pattern", "path", "expected"),
    [
        ("Downloads", "/home/u/Downloads", True),
        ("*/Downloads", "/home/u/Downloads", True),
        ("Downloads", "/home/u/Downloads/big/x.iso", True),  # a matched directory covers what is under it
        ("Downloads", "/home/u/MyDownloads", False),
        ("/home/u/Downloads", "/home/u/Downloads/a", True),
        ("/u/Downloads", "/home/u/Downloads", False),  # anchored at the root
        ("*.root", "/home/u/run/hist.root", True),
        ("*.root", "/home/u/run/hist.rootx", False),
        ("**/cache", "/home/u/.x/y/cache/z", True),
        ("/home/**/cache", "/home/u/a/cache", True),
        ("/home/**/cache", "/var/cache", False),
        ("u/.cache", "/home/u/.cache/pip", True),
        ("[^a]*.txt", "/home/u/b.txt", True),
        ("[^a]*.txt", "/home/u/a.txt", False),
        ("?.txt", "/home/u/ab.txt", False),
    ],
)
def test_patterns_follow_restics_rules(pattern, path, expected):
    assert matches(pattern, path) is expected


def test_a_negated_exclude_takes_back_what_it_matches_and_the_last_match_decides():
    f = Filter(excludes=["*.log", "!keep.log"])
    assert f.excluded("/home/u/a.log") and not f.excluded("/home/u/keep.log")
    f = Filter(excludes=["!keep.log", "*.log"])
    assert f.excluded("/home/u/keep.log")


def test_includes_take_the_directories_on_the_way_and_nothing_beside():
    f = Filter(includes=["/home/u/analysis"])
    assert f.takes("/home", True) and f.takes("/home/u", True) and f.takes("/home/u/analysis/run.C", False)
    assert not f.takes("/home/u/notes.txt", False) and not f.takes("/home/v", True)


def test_exclude_files_skip_comments_and_a_missing_one_is_one_line(tmp_path):
    p = tmp_path / "excludes"
    p.write_text("# big things\n\n  Downloads  \n*.root\n")
    assert read_file(p) == ["Downloads", "*.root"]
    with pytest.raises(UsageError, match="no-such-file"):
        read_file(tmp_path / "no-such-file")


def test_login_files_are_read_as_text_and_commands_are_never_taken():
    text = (
        "# comment\nexport ANALYSIS=/data\nPATH=\"$HOME/bin:$PATH\"\nexport A='x y' B=2\n"
        "STAMP=$(date)\nOLD=`id -u`\nif [ -x /bin/true ]; then\n  export INSIDE=1\nfi\nalias ll='ls -l'\n"
        "echo hi > /tmp/pwned\nLANG=C.UTF-8 # trailing comment\n"
    )
    found, skipped = loginenv.parse(text, "~/.profile")
    assert {k: v["value"] for k, v in found.items()} == {
        "ANALYSIS": "/data",
        "PATH": "$HOME/bin:$PATH",
        "A": "x y",
        "B": "2",
        "INSIDE": "1",
        "LANG": "C.UTF-8",
    }
    assert {s["name"] for s in skipped} == {"STAMP", "OLD"}
    script = loginenv.script(found)
    assert "export A='x y'" in script and 'export PATH="$HOME/bin:$PATH"' in script


def test_etc_environment_values_stay_literal():
    found, _ = loginenv.parse('GREETING="$HOME is here"\nexport NOT=pam\n', "/etc/environment", system=True)
    assert found["GREETING"]["raw"] == "'$HOME is here'" and "NOT" not in found


@pytest.mark.parametrize(
    "doc",
    [
        {"p": "/home/u/../../etc/shadow", "t": "f", "m": 0o644, "u": 0, "g": 0, "mt": 0},
        {"p": "home/u/relative", "t": "f", "m": 0o644, "u": 0, "g": 0, "mt": 0},
        {"p": "/home/u/a", "t": "?", "m": 0o644, "u": 0, "g": 0, "mt": 0},
        {"p": "/home/u/a", "t": "f", "m": 0o644, "u": -1, "g": 0, "mt": 0},
        {"p": "/home/u/a", "t": "f", "m": 0o644, "u": 0, "g": 0, "mt": 0, "s": "big"},
        {"p": "/home/u/a", "t": "h", "m": 0o644, "u": 0, "g": 0, "mt": 0, "l": "../x"},
        {"p": "/home/u/a\nb", "t": "f", "m": 0o644, "u": 0, "g": 0, "mt": 0},
        {"p": "/home/u/a", "t": "f", "m": 0o644, "u": 0, "g": 0, "mt": 0, "x": {"user.a": 3}},
    ],
)
def test_a_hostile_index_record_is_refused(doc):
    with pytest.raises(CorruptManifest):
        envtree.parse_page(json.dumps(doc).encode() + b"\n", "entry 'e', index page 0")


def test_a_file_outside_the_data_is_refused():
    r = Record("/home/u/a", "f", 0o644, 0, 0, 0, size=100, slot=10)
    with pytest.raises(CorruptManifest, match="outside"):
        envtree.check_slots([r], 5 * 4096, 4096, "entry 'e'")


def test_pages_depend_on_their_paths_so_a_change_touches_few():
    records = [Record(f"/home/u/f{i:05}", "f", 0o644, 1000, 1000, i) for i in range(5000)]
    before = envtree.pages(records, 64 << 10)
    records[2500].mtime_ns += 1
    after = envtree.pages(records, 64 << 10)
    assert len(before) > 40 and len(before) == len(after)
    assert sum(a != b for a, b in zip(before, after, strict=True)) == 1
    assert [r.path for p in after for r in envtree.parse_page(p, "x")] == [r.path for r in records]
