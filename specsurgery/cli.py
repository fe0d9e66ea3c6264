"""The `specsurgery` command line: arguments in, the public API's results printed.

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


class UsageError(Exception):
    """A usage error, caught by main: the command's own usage, exit 2 (JSON too with --json)."""

    def __init__(self, parser: argparse.ArgumentParser, message: str):
        super().__init__(message)
        self.parser = parser


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise UsageError(self, message)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="specsurgery", description=DESCRIPTION)
    from . import __version__

    parser.add_argument("--version", action="version", version=f"specsurgery {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    def add(name: str):
        p = sub.add_parser(name, help=COMMANDS[name].help, description=COMMANDS[name].help)
        p.add_argument("--json", action="store_true", help="machine-readable output")
        p.set_defaults(run=COMMANDS[name], usage_error=p.error)  # usage errors show this command's usage, exit 2
        subparsers[name] = p
        return p

    subparsers: dict[str, argparse.ArgumentParser] = {}
    parser.subparsers = subparsers

    for add_parsers in PARSERS:
        add_parsers(add)
    return parser


DESCRIPTION = ("Compile .spec files (an input feature schema and a model) to PyTorch checkpoints, and when a "
               "spec changes, carry the trained weights over by surgery: plan it, apply it, verify that the new "
               "model computes what the old one did, and check each commit against the project's policy.")

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
    argv = sys.argv[1:] if argv is None else list(argv)
    # --json is known before the arguments parse, so a usage error can answer in JSON too
    wants_json = "--json" in (argv[:argv.index("--")] if "--" in argv else argv)
    try:
        args, unknown = _parser().parse_known_args(argv)
        if unknown:  # argparse would name the top-level usage; the command's own is what helps
            args.usage_error(f"unrecognized arguments: {' '.join(unknown)}")
        return args.run(args)
    except UsageError as e:
        e.parser.print_usage(sys.stderr)
        return _failed(f"{e.parser.prog}: error: {e}", wants_json, status=2, file=None)
    except SpecError as e:
        print(e.render(), file=sys.stderr)
        return _json_errors([_spec_diagnostic(d) for d in e.diagnostics]) if wants_json else 1
    except UserError as e:
        return _failed(str(e), wants_json)
    except KeyboardInterrupt:
        return _failed("specsurgery: interrupted", wants_json, status=130)
    except BrokenPipeError:
        return 0
    except Exception as e:  # a bug: say so plainly, keep the traceback for those who ask
        if isinstance(e, ModuleNotFoundError) and e.name in OPTIONAL:
            return _failed(f"specsurgery: error: {args.command} needs {e.name}: "
                           f"pip install 'specsurgery[{OPTIONAL[e.name]}]'", wants_json, file=None)
        if os.environ.get("SPECSURGERY_DEBUG"):
            raise
        print(f"specsurgery: internal error: {type(e).__name__}: {e}\n"
              "  (this is a bug; SPECSURGERY_DEBUG=1 shows the traceback)", file=sys.stderr)
        return _json_errors([_user_error(f"internal error: {type(e).__name__}: {e}")], 70) if wants_json else 70


def _failed(message: str, wants_json: bool, status: int = 1, **fields) -> int:
    """One message on stderr; with --json, the same as JSON on stdout; the status either way."""
    print(message, file=sys.stderr)
    return _json_errors([{**_user_error(message), **fields}], status) if wants_json else status


def _spec_diagnostic(d) -> dict:
    span = d.span
    return {"message": d.message, "file": span.file if span else None, "line": span.line if span else None,
            "column": span.column if span else None, "hint": d.hint}


def _user_error(text: str) -> dict:
    """`path: error: message` (or `path:line:col: error: ...`) taken apart."""
    where, sep, message = text.partition("error: ")
    file = line = column = None
    if sep and (not where or where.endswith(": ")):
        parts = where[:-2].rsplit(":", 2) if where else [""]
        if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
            file, line, column = parts[0], int(parts[1]), int(parts[2])
        else:
            file = where[:-2] or None
    else:
        message = text
    return {"message": message, "file": file, "line": line, "column": column, "hint": None}


def _json_errors(errors: list[dict], status: int = 1) -> int:
    """With --json, errors come out as JSON on stdout too (the message stays on
    stderr for the person watching), with the same exit status."""
    from .render import emit_json

    emit_json({"ok": False, "exit": status, "errors": errors})
    return status


def entry() -> None:
    from . import keys

    keys.PROMOTE_SURVIVORS = True  # the process is the command's: planning may age its objects at once
    status = main()
    # Done: every file is closed and in place, every worker and thread joined.
    # Leave without tearing the interpreter down object by object (after a
    # large plan that took a seventh of a Five-sized apply); what is printed
    # is flushed first, and nothing of this package waits on atexit.
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (BrokenPipeError, OSError):  # a reader that went away: nothing more to say
        pass
    os._exit(status)
