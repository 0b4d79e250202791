"""Environment backups without images: restic's pattern rules, login files read as text, hostile index records."""

import json
import os
import subprocess

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
    script = loginenv.script(found)[0]
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


HOSTILE_LINES = (
    "W=a;touch${IFS}x1",
    "R=a|touch x2",
    "A=1 && touch x3",
    "export B=1; touch x4",
    "C=a>x5",
    "D=(touch x6)",
    'E="$(touch x7)"',
    "F=${X:-$(touch x8)}",
    "G=a`touch x9`",
    "H=$'\\x41'",
    "I=a&touch x10",
    "J=$((1+2))",
    "K=a\\",
)


def sourced(shell: str, envfile, cwd, *names: str) -> list[str]:
    """What a real shell has in ``names`` after sourcing ``envfile`` (HOME=/h, PATH=/usr/bin:/bin)."""
    shown = " ".join(f'"${n}"' for n in names)
    r = subprocess.run(
        [shell, "-c", f". {envfile} && printf '%s\\n' {shown}"],
        cwd=cwd,
        env={"HOME": "/h", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=True,
    )
    return r.stdout.splitlines()


@pytest.mark.parametrize("shell", ["sh", "bash"])
def test_a_value_with_a_shell_operator_is_not_taken_and_the_written_file_runs_nothing(shell, tmp_path):
    text = "\n".join((*HOSTILE_LINES, "OK='plain value'", 'P="$HOME/bin:$PATH"', "T=~/bin:x", "Q=it\\'s")) + "\n"
    found, skipped = loginenv.parse(text, "~/.profile")
    assert set(found) == {"OK", "P", "T", "Q"}
    by_name = {s["name"]: s["source"] for s in skipped}
    assert by_name == {line.split("=")[0].split()[-1]: f"~/.profile:{i}" for i, line in enumerate(HOSTILE_LINES, 1)}
    envfile = tmp_path / "env"
    envfile.write_text(loginenv.script(found)[0])
    assert sourced(shell, envfile, tmp_path, "OK", "P", "T", "Q") == [
        "plain value",
        "/h/bin:/usr/bin:/bin",
        "/h/bin:x",
        "it's",
    ]
    assert sorted(os.listdir(tmp_path)) == ["env"]  # no x1, x2, ...: nothing ran


def test_a_backup_whose_stored_values_hold_commands_writes_them_not():
    """A backup made by hand may store any text as a value: restore writes only what parses as a plain value."""
    text, refused = loginenv.script(
        {"W": {"raw": "a;touch x"}, "V": {"raw": "'ok'"}, "S": {"raw": '"$(id)"'}, "P": {"raw": '"$HOME/b"'}}
    )
    assert refused == ["S", "W"]
    assert "export V=ok" in text and 'export P="$HOME/b"' in text and "touch" not in text and "id" not in text
