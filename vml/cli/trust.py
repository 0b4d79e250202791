"""vml certify and vml trust: certificates of entries, the keys whose certificates count, and the policy."""

import json
from pathlib import Path

from .. import config, home, keys, trust
from ..errors import UsageError
from .output import table


def cmd_certify(args) -> int:
    cfg = config.Config.load()
    repo = cfg.open(args.repo)
    cert = trust.certify(repo, args.entry, Path(args.key), args.level, args.message or "", cfg.trusted_keys())
    print(f"certified {args.entry} of {repo.name} at level {cert.level} (manifest {cert.manifest.hex()[:16]})")
    return 0


def _key_text(arg: str) -> str:
    """PUBKEY: a file as `vml keygen` writes KEYFILE.pub, or the key itself."""
    return arg if arg.startswith(keys.KEY_PREFIX) else keys.read_public_key(Path(arg))


def cmd_trust_add(args) -> int:
    key = trust.trusted_key(_key_text(args.pubkey), args.name, args.level)
    home.trust_key(config.vml_home(), key, args.system)
    levels = f"level {key.levels[0]}" if key.levels else "any level"
    print(f"trusted {key.name} ({key.key[:24]}…) to certify {levels}{' for every user' if args.system else ''}")
    return 0


def cmd_trust_rm(args) -> int:
    home.distrust_key(config.vml_home(), args.name, args.system)
    print(f"removed trusted key {args.name}")
    return 0


def cmd_trust_list(args) -> int:
    cfg = config.Config.load()
    system = trust.load_system()
    rows = [(k, "machine") for k in system.keys.values()] + [(k, "user") for k in cfg.trust.values()]
    policies = [(p, "machine") for p in [system.policy] if p] + [(p, "user") for p in [cfg.policy] if p]
    if args.json:
        doc = {
            "keys": [{"name": k.name, "key": k.key, "levels": list(k.levels), "scope": s} for k, s in rows],
            "policies": [{**p.doc(), "file": p.source, "scope": s} for p, s in policies],
        }
        print(json.dumps(doc, indent=2))
        return 0
    lines = table(
        [[k.name, k.key, ",".join(k.levels) or "any", s] for k, s in rows], ["name", "key", "levels", "scope"]
    )
    print("\n".join(lines) if rows else "(no trusted keys)")
    for p, s in policies:
        changes = "; uncertified changes on a certified entry allowed" if p.allow_user_changes else ""
        print(f"policy ({s}, {p.source}): require level {p.require}{changes}")
    if not policies:
        print("policy: none (any entry runs)")
    return 0


def cmd_trust_policy(args) -> int:
    if bool(args.require) == bool(args.off):
        raise UsageError("give --require LEVEL or --off")
    if args.off and args.allow_user_changes:
        raise UsageError("--allow-user-changes goes with --require")
    home.set_policy(config.vml_home(), args.require, args.allow_user_changes, args.system)
    where = "every user of this machine" if args.system else "you"
    if args.off:
        still = trust.load_system().policy
        rest = f"; the machine's policy (level {still.require}) still applies" if still and not args.system else ""
        print(f"policy off for {where}{rest}")
    else:
        print(f"entries must be certified at level {args.require} by a trusted key to run, for {where}")
    return 0


def register(cli) -> None:
    sp = cli.add("certify", cmd_certify, "sign an entry's manifest at a level with your key")
    sp.add_argument("entry", metavar="ENTRY")
    sp.add_argument("--key", required=True, metavar="KEYFILE", help="private key from `vml keygen`")
    sp.add_argument("--level", default="certified", metavar="NAME", help="what it is certified for (default certified)")
    sp.add_argument("-m", "--message", metavar="NOTE", help="a note kept in the certificate")

    sp = cli.add("trust", None, "the keys whose certificates count, and what may run")
    tsub = sp.add_subparsers(dest="trust_command", metavar="ACTION", required=True)
    system = cli.parent()
    system.add_argument("--system", action="store_true", help="the machine's, in /etc/vml/policy.toml (root)")
    t = cli.add_to(tsub, "add", cmd_trust_add, "trust a certifier's public key", system)
    t.add_argument("pubkey", metavar="PUBKEY", help="KEYFILE.pub, or the key (ed25519:...)")
    t.add_argument("--name", required=True, metavar="SITE")
    t.add_argument("--level", metavar="NAME", help="the only level it may certify (default: any)")
    t = cli.add_to(tsub, "rm", cmd_trust_rm, "stop trusting a key", system)
    t.add_argument("name", metavar="SITE")
    t = cli.add_to(tsub, "list", cmd_trust_list, "trusted keys and policies in force")
    t.add_argument("--json", action="store_true")
    t = cli.add_to(tsub, "policy", cmd_trust_policy, "require certified entries to open, boot and deploy", system)
    t.add_argument("--require", metavar="LEVEL", help="the level an entry must be certified at")
    t.add_argument("--allow-user-changes", action="store_true", help="also uncertified entries on a certified one")
    t.add_argument("--off", action="store_true", help="remove this policy")
