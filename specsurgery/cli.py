"""The `specsurgery` command: a thin layer that parses arguments and prints.

Every command has --json and --help. Errors a user can cause (a wrong spec, a
missing file, a corrupt checkpoint, a bad record) print one clear message and
exit 1; usage errors exit 2; no traceback reaches the terminal.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

# The command has no use for pydantic plugins, and looking them up (entry points
# through importlib.metadata) costs the pre-commit hook time on every commit.
os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")

from .errors import PrintableStream, SpecError, UserError  # noqa: E402
from .commands import COMMANDS, PARSERS  # noqa: E402


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="specsurgery", description=__doc__.splitlines()[0])
    from . import __version__

    parser.add_argument("--version", action="version", version=f"specsurgery {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    def add(name: str):
        p = sub.add_parser(name, help=COMMANDS[name].help, description=COMMANDS[name].help)
        p.add_argument("--json", action="store_true", help="machine-readable output")
        p.set_defaults(run=COMMANDS[name])
        return p

    for add_parsers in PARSERS:
        add_parsers(add)
    return parser


OPTIONAL = {"torch": "torch", "matplotlib": "plot"}  # optional module -> the extra that installs it


def main(argv: Optional[list[str]] = None) -> int:
    # Everything printed passes printable(): names, metadata and reasons read from
    # files cannot send escape sequences to the terminal.
    streams = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = PrintableStream(sys.stdout), PrintableStream(sys.stderr)
    try:
        return _run(argv)
    finally:
        sys.stdout, sys.stderr = streams


def _run(argv: Optional[list[str]]) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except SpecError as e:
        print(e.render(), file=sys.stderr)
        return 1
    except UserError as e:
        print(str(e), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("specsurgery: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except Exception as e:  # a bug: say so plainly, keep the traceback for those who ask
        if isinstance(e, ModuleNotFoundError) and e.name in OPTIONAL:
            print(f"specsurgery: error: {args.command} needs {e.name}: pip install 'specsurgery[{OPTIONAL[e.name]}]'",
                  file=sys.stderr)
            return 1
        if os.environ.get("SPECSURGERY_DEBUG"):
            raise
        print(f"specsurgery: internal error: {type(e).__name__}: {e}\n"
              "  (this is a bug; SPECSURGERY_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 70


def entry() -> None:
    sys.exit(main())
