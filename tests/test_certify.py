"""Certification: `vml certify`, `vml trust`, and the policy that open, boot and Start apply.

Real repositories, real bundles, a real nginx remote; the policy's refusals
are checked through the `vml` command as a user meets them.
"""

import json
import os
import shutil
from pathlib import Path

import pytest

from vml import trust

from conftest import Vml, need_root
from helpers import rewrite_bundle, snapshot
from servers import Nginx


@pytest.fixture
def site(vml, tmp_path):
    """Repository rep with base (full) and child (incremental on base), and two key pairs."""
    img = tmp_path / "disk.img"
    img.write_bytes(os.urandom(256 << 10) + bytes(768 << 10))
    vml("init", tmp_path / "rep", "--chunk-size", "4K")
    vml("save", "base", "--from", img)
    with open(img, "r+b") as f:
        f.write(b"changed by the user")
    vml("save", "child", "--from", img, "--parent", "base")
    for k in ("cern", "other"):
        vml("keygen", tmp_path / k)
    return tmp_path


def refs(repo: Path) -> dict:
    return json.loads((repo / "refs.json").read_text())["entries"]


def test_an_uncertified_entry_is_refused_and_a_certified_one_opens(vml, site):
    before = refs(site / "rep")
    vml("trust", "policy", "--require", "production")
    line = vml.fails("open", "base", "--area", "a1", status=16)
    assert "entry 'base' of rep is not certified at level 'production' by a trusted key" in line
    assert "it has no certificate" in line
    assert not (Path(vml.env["VML_HOME"]) / "areas" / "a1").exists()

    vml("certify", "base", "--key", site / "other", "--level", "production")
    assert "by an untrusted key" in vml.fails("open", "base", "--area", "a1")
    vml("trust", "add", site / "cern.pub", "--name", "cern")
    vml("certify", "base", "--key", site / "cern", "--level", "testing", "-m", "smoke tests passed")
    line = vml.fails("open", "base", "--area", "a1")
    assert "level 'testing' by cern" in line and "untrusted key" in line

    out = vml("certify", "base", "--key", site / "cern", "--level", "production").stdout
    assert "certified base of rep at level production" in out
    assert refs(site / "rep") == before  # certifying does not change the entry's identity
    vml("open", "base", "--area", "a1")

    shown = vml("show", "base").stdout
    assert "certified: level production by cern" in shown
    assert "certified: level testing by cern" in shown and "smoke tests passed" in shown
    assert "untrusted key" in shown
    info = json.loads(vml("show", "base", "--json").stdout)
    assert sorted(c["level"] for c in info["certificates"]) == ["production", "production", "testing"]

    # boot checks again: the policy may have tightened since the area was opened
    vml("trust", "policy", "--require", "gold")
    assert "'base' of rep is not certified at level 'gold'" in vml.fails(
        "boot", "a1", "--hypervisor", "qemu", "--dry-run"
    )
    vml("trust", "policy", "--off")
    assert "policy: none" in vml("trust", "list").stdout


def test_user_changes_on_a_certified_base_run_only_when_the_policy_allows_them(vml, site):
    vml("trust", "add", site / "cern.pub", "--name", "cern", "--level", "production")
    vml("certify", "base", "--key", site / "cern", "--level", "production")
    vml("trust", "policy", "--require", "production")
    assert "'child' of rep is not certified" in vml.fails("open", "child", "--area", "c1")
    vml("trust", "policy", "--require", "production", "--allow-user-changes")
    vml("open", "child", "--area", "c1")
    listed = vml("trust", "list").stdout
    assert "require level production; uncertified changes on a certified entry allowed" in listed
    assert "cern" in listed and "production" in listed


def test_a_certificate_of_another_manifest_or_with_a_changed_level_is_refused(vml, site):
    vml("trust", "add", site / "cern.pub", "--name", "cern")
    vml("certify", "base", "--key", site / "cern", "--level", "production")
    certs = site / "rep" / "certificates"
    base, child = refs(site / "rep")["base"], refs(site / "rep")["child"]
    (good,) = (certs / base).iterdir()
    (certs / child).mkdir()
    shutil.copy(good, certs / child / good.name)  # moved onto other content
    vml("trust", "policy", "--require", "production")
    line = vml.fails("open", "child", "--area", "c1")
    assert f"it certifies manifest {base[:16]}, not {child[:16]}" in line

    doc = json.loads(good.read_text())
    doc["payload"] = doc["payload"].replace('"level":"production"', '"level":"gold"')
    (certs / child / good.name).unlink()
    (certs / base / good.name).write_text(json.dumps(doc))
    vml("trust", "policy", "--require", "gold")
    line = vml.fails("open", "base", "--area", "b1")
    assert "its signature does not verify with the key it names" in line
    assert "not valid: its signature does not verify" in vml("show", "base").stdout


def test_certificates_travel_in_bundles_and_a_tampered_one_is_refused_at_import(vml, site):
    vml("certify", "base", "--key", site / "cern", "--level", "production")
    vml("certify", "child", "--key", site / "cern", "--level", "testing")
    vml("export", "child", "-o", site / "child.vml", "--full")
    vml("init", site / "rep2", "--chunk-size", "4K")
    before = snapshot(site / "rep2")

    def tamper(name, data):
        if name == "vml-bundle.json":
            changed = data.replace(b'\\"level\\":\\"testing\\"', b'\\"level\\":\\"production\\"')
            assert changed != data
            data = changed
        return name, data

    rewrite_bundle(site / "child.vml", site / "tampered.vml", tamper)
    line = vml.fails("import", site / "tampered.vml", "--repo", site / "rep2")
    assert "tampered.vml: certificate of manifest" in line and "does not verify" in line and "refused" in line
    assert snapshot(site / "rep2") == before and not (site / "rep2" / "certificates").exists()

    vml("import", site / "child.vml", "--repo", site / "rep2")
    vml("trust", "add", site / "cern.pub", "--name", "cern")
    shown = vml("show", "child", "--repo", site / "rep2").stdout
    assert "certified: level testing by cern" in shown
    assert "certified: level production by cern" in vml("show", "base", "--repo", site / "rep2").stdout


def test_certificates_travel_with_publish_and_gc_keeps_only_those_of_kept_entries(vml, site, home):
    vml("certify", "base", "--key", site / "cern", "--level", "production")
    vml("certify", "child", "--key", site / "cern", "--level", "production")
    vml("keygen", site / "pubkey")
    vml("publish", site / "pub", "--key", site / "pubkey")
    server = Nginx(site / "pub")
    try:
        reader = Vml(site / "reader", site)
        reader("remote", "add", "cern", server.url, "--key", site / "pubkey.pub")
        reader("init", site / "mine", "--chunk-size", "4K")
        reader("trust", "add", site / "cern.pub", "--name", "cern")
        reader("trust", "policy", "--require", "production")
        assert "certified: level production by cern" in reader("show", "cern:base").stdout
        reader("open", "cern:base", "--area", "r1", "--repo", "mine")
    finally:
        server.stop()

    child = refs(site / "rep")["child"]
    vml("rm", "child")
    vml("gc")
    assert not (site / "rep" / "certificates" / child).exists()
    assert (site / "rep" / "certificates" / refs(site / "rep")["base"]).is_dir()


def test_the_machine_policy_binds_every_user_and_only_its_keys_count(vml, site):
    need_root()
    assert not trust.SYSTEM_POLICY.exists(), f"{trust.SYSTEM_POLICY} left by someone else: not overwriting it"
    try:
        vml("trust", "add", site / "cern.pub", "--name", "cern", "--system")
        vml("trust", "policy", "--require", "production", "--system")
        assert oct(trust.SYSTEM_POLICY.stat().st_mode & 0o777) == "0o644"
        vml("trust", "add", site / "other.pub", "--name", "mine")  # the user's own key
        vml("certify", "base", "--key", site / "other", "--level", "production")
        line = vml.fails("open", "base", "--area", "a1")
        assert f"(policy of {trust.SYSTEM_POLICY})" in line and "untrusted key" in line
        out = vml("trust", "policy", "--off").stdout  # the user's own policy: off; the machine's stays
        assert "the machine's policy (level production) still applies" in out
        vml.fails("open", "base", "--area", "a1")
        vml("certify", "base", "--key", site / "cern", "--level", "production")
        vml("open", "base", "--area", "a1")
        vml("trust", "policy", "--require", "gold")  # a user's policy adds to the machine's
        assert "level 'gold'" in vml.fails("open", "base", "--area", "a2")
        vml("trust", "policy", "--off")
        trust.SYSTEM_POLICY.write_text("[policy\n")
        line = vml.fails("open", "base", "--area", "a2")
        assert "cannot read the machine's policy" in line and "nothing runs until it is fixed" in line
    finally:
        trust.SYSTEM_POLICY.unlink(missing_ok=True)


def test_bad_trust_input_is_one_line(vml, site):
    assert "not a VML public key" in vml.fails("trust", "add", "ed25519:nonsense", "--name", "x")
    assert "invalid level name" in vml.fails("certify", "base", "--key", site / "cern", "--level", "a b")
    assert "no trusted key named 'nobody'" in vml.fails("trust", "rm", "nobody")
    assert "give --require LEVEL or --off" in vml.fails("trust", "policy")
    assert "no such key file" in vml.fails("certify", "base", "--key", site / "missing")
    vml("trust", "add", site / "cern.pub", "--name", "cern")
    assert "exists" in vml.fails("trust", "add", site / "other.pub", "--name", "cern")


# -- issue 22: what two attacks found ------------------------------------------------


def test_a_strict_policy_boots_an_area_only_while_its_disks_hold_the_certified_bytes(vml, site, mounted):
    vml("trust", "add", site / "cern.pub", "--name", "cern")
    vml("certify", "base", "--key", site / "cern", "--level", "production")
    vml("trust", "policy", "--require", "production")
    vml("open", "base", "--area", "a1")
    dry_run = ("boot", "a1", "--hypervisor", "qemu", "--dry-run")
    vml(*dry_run)
    disk = mounted / "areas" / "a1" / "disk.img"
    original = disk.read_bytes()[40960:40980]
    with open(disk, "r+b") as f:
        f.seek(40960)
        f.write(b"not what cern signed")
    for args in (dry_run, dry_run[:-1]):  # the refusal comes before any VM starts
        line = vml.fails(*args, status=16)
        assert "working area 'a1'" in line and "disk 'disk'" in line and "'base'" in line
        assert "--allow-user-changes" in line and "certify" in line
    with open(disk, "r+b") as f:  # written, but the bytes are the certified ones again
        f.seek(40960)
        f.write(original)
    vml(*dry_run)
    with open(disk, "r+b") as f:
        f.seek(40960)
        f.write(b"changed again")
    vml("trust", "policy", "--require", "production", "--allow-user-changes")
    vml(*dry_run)


def _junk_certificates(manifest_hex: str, n: int) -> list[dict]:
    """``n`` certificates of the manifest that verify, each by a fresh key no one trusts."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from vml.repo import certificates

    m = bytes.fromhex(manifest_hex)
    return [
        certificates.as_object(certificates.make(Ed25519PrivateKey.generate(), m, "base", "junk")) for _ in range(n)
    ]


def _write_bundle(path: Path, index: dict) -> Path:
    import io
    import tarfile

    data = json.dumps(index).encode()
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        info = tarfile.TarInfo("vml-bundle.json")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return path


def _add_certificates(src: Path, dst: Path, certs: dict[str, list[dict]]) -> Path:
    def change(name, data):
        if name == "vml-bundle.json":
            index = json.loads(data)
            for m, extra in certs.items():
                index.setdefault("certificates", {}).setdefault(m, []).extend(extra)
            data = json.dumps(index).encode()
        return name, data

    rewrite_bundle(src, dst, change)
    return dst


def test_a_bundles_certificates_of_entries_it_does_not_carry_are_ignored(vml, site):
    base = refs(site / "rep")["base"]
    index = {
        "format": 1,
        "entries": [],
        "requires": [],
        "objects": 0,
        "certificates": {base: _junk_certificates(base, 64)},
    }
    vml("import", _write_bundle(site / "junk.vml", index))
    assert not list((site / "rep" / "certificates").glob("*/*.json"))
    vml("trust", "add", site / "cern.pub", "--name", "cern")
    vml("certify", "base", "--key", site / "cern", "--level", "production")
    vml("trust", "policy", "--require", "production")
    vml("open", "base", "--area", "a1")


def test_a_flood_of_untrusted_certificates_never_blocks_a_trusted_one(vml, site):
    from vml.keys import parse_public_key
    from vml.remotes import catalog
    from vml.repo import certificates

    base = refs(site / "rep")["base"]
    vml("export", "base", "-o", site / "base.vml", "--full")
    flood = _add_certificates(site / "base.vml", site / "flood.vml", {base: _junk_certificates(base, 70)})
    vml("import", flood)  # base is here already: only its certificates come, as many as the cap takes
    kept = site / "rep" / "certificates" / base
    assert len(list(kept.iterdir())) == certificates.PER_MANIFEST
    vml("keygen", site / "pubkey")
    vml("publish", site / "pub", "--key", site / "pubkey")

    vml("certify", "base", "--key", site / "cern", "--level", "production")  # the signer's own key counts
    assert len(list(kept.iterdir())) == certificates.PER_MANIFEST
    vml("trust", "add", site / "cern.pub", "--name", "cern")
    vml("trust", "policy", "--require", "production")
    vml("open", "base", "--area", "a1")
    vml("publish", site / "pub", "--key", site / "pubkey")  # the catalog had 64 already: the new one goes in
    pub = catalog.verify(
        (site / "pub" / "catalog.json").read_bytes(),
        parse_public_key((site / "pubkey.pub").read_text(), "key"),
        "catalog",
    )
    cern = (site / "cern.pub").read_text().strip()
    assert any(cern in c["payload"] for c in pub.certificates[bytes.fromhex(base)])

    # Another repository, flooded the same way, takes cern's certificate from a bundle.
    vml("init", site / "rep2", "--chunk-size", "4K")
    vml("import", flood, "--repo", site / "rep2")
    vml("export", "base", "-o", site / "certified.vml", "--full")
    vml("import", site / "certified.vml", "--repo", site / "rep2")
    vml("open", "base", "--repo", site / "rep2", "--area", "a2")
    assert len(list((site / "rep2" / "certificates" / base).iterdir())) == certificates.PER_MANIFEST


def test_the_machine_policy_refuses_everything_unless_it_is_a_readable_well_formed_file(vml, site, monkeypatch):
    import subprocess
    import sys

    from vml.config import Config
    from vml.errors import CorruptManifest

    path = site / "etc" / "policy.toml"
    monkeypatch.setattr(trust, "SYSTEM_POLICY", path)
    cfg = Config.load()
    repo, entry = cfg.find_entry("base", None)
    cfg.check_certified(repo, entry)  # nothing at the path: no machine policy
    path.parent.mkdir()
    cfg.check_certified(repo, entry)

    def refused(why: str) -> None:
        with pytest.raises(CorruptManifest) as e:
            cfg.check_certified(repo, entry)
        text = str(e.value)
        assert text.startswith(f"{path}: ") and text.count("nothing runs until it is fixed") == 1, why
        assert "\n" not in text, why

    path.symlink_to(site / "etc" / "missing.toml")
    refused("a dangling symlink")
    path.unlink()
    # The policy past the first MiB: a read cut there would see none.
    path.write_text("# " + "x" * (1 << 20) + '\n[policy]\nrequire = "production"\n')
    refused("over 1 MiB")
    path.unlink()
    path.mkdir()
    refused("a directory")
    path.rmdir()
    path.write_text("[policy\n")
    refused("malformed")
    path.write_text('[policy]\nrequire = "production"\n')
    if os.geteuid() == 0:  # a policy others may change is theirs, not the machine's (as sshd's StrictModes)
        path.chmod(0o666)
        refused("writable by others")
        path.chmod(0o644)
        os.chown(path, 65534, 65534)
        refused("owned by another user than root")
        os.chown(path, 0, 0)
    path.chmod(0)
    if os.geteuid() != 0:  # root reads it anyway
        refused("unreadable")
    path.unlink()
    os.mkfifo(path)
    code = "import sys; from pathlib import Path; from vml import trust; trust.load_system(Path(sys.argv[1]))"
    r = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode != 0 and "CorruptManifest" in r.stderr and "not a regular file" in r.stderr
    refused("a FIFO")


def _forged_certificate(manifest_hex: str, note: str) -> bytes:
    """A certificate whose signature verifies, made without make()'s checks."""
    import base64

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from vml.keys import public_key_text
    from vml.repo import certificates

    key = Ed25519PrivateKey.generate()
    payload = {
        "type": "vml-certificate",
        "version": 1,
        "manifest": manifest_hex,
        "entry": "base",
        "level": "testing",
        "key": public_key_text(key.public_key()),
        "certified": "2026-12-01T10:00:00Z",
        "note": note,
    }
    text = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
    return certificates.encode({"payload": text.decode(), "signature": base64.b64encode(key.sign(text)).decode()})


def test_show_prints_no_forged_line_from_a_certificate_or_a_message(vml, site):
    from vml.repo import certificates

    base = refs(site / "rep")["base"]
    forged = "fine\n  certified: level production by cern on 2026-12-01"
    certificates.keep(site / "rep", bytes.fromhex(base), _forged_certificate(base, forged))
    for c in ("\x1b[2J", "x" * 1001):
        certificates.keep(site / "rep", bytes.fromhex(base), _forged_certificate(base, c))
    shown = vml("show", "base").stdout
    assert "by cern" not in shown and "\x1b" not in shown
    lines = [ln for ln in shown.splitlines() if ln.startswith("  certified:")]
    assert len(lines) == 3 and all("not valid: not a VML certificate (the note must be one line" in ln for ln in lines)

    vml("export", "base", "-o", site / "base.vml", "--full")
    bad = _add_certificates(
        site / "base.vml", site / "bad.vml", {base: [json.loads(_forged_certificate(base, forged))]}
    )
    vml("init", site / "rep2", "--chunk-size", "4K")
    line = vml.fails("import", bad, "--repo", site / "rep2")
    assert "bad.vml: certificate of manifest" in line and "the note must be one line" in line

    img = site / "disk.img"
    vml("save", "forged", "--from", img, "-m", "ok\n  certified: level production by cern")
    shown = vml("show", "forged").stdout
    assert "by cern" in shown and not any(ln.startswith("  certified:") for ln in shown.splitlines())
    assert "  message:   ok\\n  certified: level production by cern" in shown


def test_a_fifo_among_the_certificate_files_is_passed_over(vml, site):
    vml("trust", "add", site / "cern.pub", "--name", "cern")
    vml("certify", "base", "--key", site / "cern", "--level", "production")
    vml("trust", "policy", "--require", "production")
    d = site / "rep" / "certificates" / refs(site / "rep")["base"]
    os.mkfifo(d / ("0" * 64 + ".json"))  # listed first
    (d / ("1" * 64 + ".json")).mkdir()
    vml("open", "base", "--area", "a1", timeout=60)
    assert "certified: level production by cern" in vml("show", "base", timeout=60).stdout


def test_a_private_key_others_may_read_is_refused(vml, site):
    key = site / "cern"
    assert key.stat().st_mode & 0o777 == 0o600  # as vml keygen writes it
    for mode in (0o644, 0o640, 0o604):
        key.chmod(mode)
        line = vml.fails("certify", "base", "--key", key, "--level", "production", status=2)
        assert f"{key}: permissions 0{mode:o} are too open" in line and f"chmod 600 {key}" in line
        line = vml.fails("publish", site / "pub", "--key", key, status=2)
        assert f"{key}: permissions 0{mode:o} are too open" in line
    assert not (site / "pub").exists() and not (site / "rep" / "certificates").exists()
    key.chmod(0o600)
    vml("certify", "base", "--key", key, "--level", "production")
    vml("publish", site / "pub", "--key", key)
