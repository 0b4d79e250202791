"""Settings and files a user names: damaged config, limits, special files, names reserved or taken."""

import os
import subprocess
import sys

import pytest

from vml.errors import CorruptManifest
from vml.repo import chunkmap, objects

from helpers import CS, assert_untouched, bundle, manifest, set_web_password, snapshot


@pytest.fixture
def rep(vml, tmp_path):
    vml("init", tmp_path / "rep", "--chunk-size", "4K")
    return tmp_path / "rep"


def test_damaged_settings_give_one_line_errors(vml, rep, tmp_path, home):
    (rep / "vml-repository.json").write_text("[1]")
    assert "not a JSON object" in vml.fails("log", "--repo", rep, status=6)
    cfg = home / "config.toml"
    saved = cfg.read_text()
    cfg.write_text('repositories = "x"\n')
    assert "invalid [repositories] section" in vml.fails("consult", status=6)
    cfg.write_text('default = ["rep"]\n' + saved.replace('default = "rep"', ""))
    assert "default must be a repository name" in vml.fails("consult", status=6)
    assert "cannot create repository" in vml.fails("init", "/proc/vml-test", status=10)


def test_a_configured_size_limit_refuses_larger_entries(vml, rep, tmp_path, home):
    chunk = os.urandom(CS)
    m = chunkmap.encode([(0, objects.digest(chunk), 0)])
    b = bundle(tmp_path / "big.vml", [("x", manifest(size=2 << 40, map_digest=objects.digest(m)))], [m, chunk])
    before = snapshot(rep)
    with open(home / "config.toml", "a") as f:
        f.write('\n[limits]\nmax_disk_size = "1T"\n')
    msg = vml.fails("import", b, status=6)
    assert "x declares 2199023255552 bytes, more than the limit of 1099511627776" in msg and "big.vml" in msg
    assert_untouched(vml, rep, before)
    disk = tmp_path / "d.img"
    disk.write_bytes(os.urandom(CS))
    os.truncate(disk, (1 << 40) + CS)
    assert "d declares 1099511631872 bytes, more than the limit" in vml.fails("save", "big", "--from", disk, status=9)
    assert_untouched(vml, rep, before)
    (home / "config.toml").write_text((home / "config.toml").read_text().replace('"1T"', '"a lot"'))
    assert "[limits] max_disk_size" in vml.fails("log", status=6)


def test_special_files_given_as_key_files_fail_at_once(vml, rep, tmp_path):
    fifo = tmp_path / "key.fifo"
    os.mkfifo(fifo)
    for args in (
        ("publish", tmp_path / "pub", "--key", fifo),
        ("remote", "add", "r", "http://127.0.0.1:9", "--key", fifo),
    ):
        r = subprocess.run(
            [sys.executable, "-m", "vml", *map(str, args)], env=vml.env, capture_output=True, text=True, timeout=20
        )
        assert (
            r.returncode == 2
            and r.stderr.strip() == f"vml: error: {fifo}: not a regular file (a key file was expected)"
        )
    assert "not a regular file" in vml.fails("publish", tmp_path / "pub", "--key", "/dev/zero", status=2)


def test_remote_names_the_mount_keeps_or_repositories_use_are_refused(vml, rep, tmp_path, home):
    cfg = home / "config.toml"
    saved = cfg.read_text()
    remote = '\n[remotes.{}]\nurl = "http://127.0.0.1:9"\nkey = "ed25519:' + "A" * 43 + '="\n'
    cfg.write_text(saved + remote.format("areas"))
    assert "invalid remote name 'areas': it is reserved" in vml.fails("consult", status=6)
    cfg.write_text(saved + remote.format("rep"))
    assert "'rep' names both a repository and a remote" in vml.fails("log", status=6)


def test_the_mount_memory_bound_is_a_size_and_too_small_a_one_is_refused(home):
    from vml.config import DEFAULT_MOUNT_MEMORY, Config
    from vml.entries.reader import chunk_cache_bytes

    home.mkdir()
    assert Config.load(home).mount_memory == DEFAULT_MOUNT_MEMORY == 512 << 20
    assert chunk_cache_bytes(DEFAULT_MOUNT_MEMORY) == 192 << 20  # the rest: the process and what comes ahead
    (home / "config.toml").write_text('[limits]\nmount_memory = "1G"\n')
    cfg = Config.load(home)
    assert cfg.mount_memory == 1 << 30
    cfg.write()  # kept when the config is written again
    assert Config.load(home).mount_memory == 1 << 30
    for bad in ('"100M"', '"lots"', "true"):
        (home / "config.toml").write_text(f"[limits]\nmount_memory = {bad}\n")
        with pytest.raises(CorruptManifest, match=r"\[limits\] mount_memory"):
            Config.load(home)


def test_a_repository_opened_by_path_is_named_only_by_a_valid_directory_name(vml, rep, tmp_path):
    """The name reaches the mount, records and batch scripts: a newline in it must not."""
    disk = tmp_path / "d.img"
    disk.write_bytes(os.urandom(CS))
    vml("save", "e", "--from", disk)
    evil = tmp_path / "rep\ntouch ran #"
    rep.rename(evil)
    line = vml.fails("log", evil, status=2)
    assert repr(str(evil)) in line and "vml init PATH --name NAME" in line
    assert repr(evil.name) in vml.fails("show", f"{evil}:e", status=2)
    vml("init", evil, "--name", "renamed")  # registered, it has a name of its own
    assert "renamed" in vml("show", f"{evil}:e").stdout


def test_config_toml_holds_a_password_hash_so_only_its_owner_may_read_it(vml, home, tmp_path):
    assert "password set" in set_web_password(vml, "correct horse battery").stdout
    cfg = home / "config.toml"
    assert "scrypt$" in cfg.read_text()
    assert cfg.stat().st_mode & 0o777 == 0o600
    # A config made readable by others (by hand, or by an older vml) is tightened when next rewritten.
    cfg.chmod(0o644)
    vml("init", tmp_path / "rep2")
    assert cfg.stat().st_mode & 0o777 == 0o600
    assert "scrypt$" in cfg.read_text() and "rep2" in cfg.read_text()
