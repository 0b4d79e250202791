"""The `vml` command: argument parsing and output, nothing else.

Each module of this package holds a group of commands, each a function
that parses nothing itself (argparse did), calls the library and prints;
its ``register`` adds the group's parsers. Errors from the library are
printed as one line, ``vml: error: ...``, and exit with the status their
class carries; a traceback only with --debug.
"""

import argparse
import logging
import sys

from ..errors import VmlError
from . import areas, deploy, entries, envs, remotes, repos, trust, web

INTERNAL_ERROR = 70


class Commands:
    """What a command module needs to add its parsers: the subparsers and the shared options."""

    def __init__(self):
        self.parser = argparse.ArgumentParser(prog="vml", description="Virtual Machine Logbook")
        # --repo and --debug go before or after the command. The subcommands'
        # copies default to SUPPRESS, so they do not overwrite a value given
        # before the command.
        self.common = argparse.ArgumentParser(add_help=False)
        for parser, default in ((self.parser, None), (self.common, argparse.SUPPRESS)):
            parser.add_argument(
                "--repo", metavar="REPO", default=default, help="repository name from the config, or a path"
            )
            parser.add_argument(
                "--debug", action="store_true", default=default or False, help="print a traceback on errors"
            )
        self.sub = self.parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def parent(self) -> argparse.ArgumentParser:
        """A parser of options shared by several commands."""
        return argparse.ArgumentParser(add_help=False)

    def add(self, name: str, fn, help_text: str, *parents) -> argparse.ArgumentParser:
        return self.add_to(self.sub, name, fn, help_text, *parents)

    def add_to(self, sub, name: str, fn, help_text: str, *parents) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_text, description=help_text, parents=[self.common, *parents])
        if fn is not None:
            sp.set_defaults(func=fn)
        return sp


def build_parser() -> argparse.ArgumentParser:
    cli = Commands()
    for module in (repos, entries, areas, remotes, envs, trust, deploy, web):
        module.register(cli)
    return cli.parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and getattr(args, "func", None) is remotes.cmd_publish and not any(a.startswith("-") for a in extra):
        args.entries += extra  # `vml publish DIR --key KEY ENTRY...`: entries after the option
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(format="vml: %(message)s", level=logging.DEBUG if args.debug else logging.WARNING)
    try:
        return args.func(args)
    except VmlError as e:
        if args.debug:
            raise
        print(f"vml: error: {e}", file=sys.stderr)
        return e.exit_status
    except KeyboardInterrupt:
        print("vml: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except Exception as e:  # a bug: say so in one line, details with --debug
        if args.debug:
            raise
        print(f"vml: internal error: {type(e).__name__}: {e} (rerun with --debug for details)", file=sys.stderr)
        return INTERNAL_ERROR


if __name__ == "__main__":
    sys.exit(main())
