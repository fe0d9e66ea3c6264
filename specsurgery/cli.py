"""The `specsurgery` command: a thin layer that parses arguments and prints.

Every command has --json and --help. Errors a user can cause (a wrong spec, a
missing file, a corrupt checkpoint, a bad record) print one clear message and
exit 1; usage errors exit 2; no traceback reaches the terminal.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Callable, Optional

# The command has no use for pydantic plugins, and looking them up (entry points
# through importlib.metadata) costs the pre-commit hook time on every commit.
os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")

from .errors import SpecError, UserError  # noqa: E402

COMMANDS: dict[str, Callable] = {}


def command(name: str, help: str):
    def register(fn):
        fn.help = help
        COMMANDS[name] = fn
        return fn

    return register


def emit_json(payload) -> None:
    json.dump(payload, sys.stdout, indent=2, sort_keys=False)
    sys.stdout.write("\n")


def table(rows: list[list[str]], header: list[str], right: tuple[int, ...] = ()) -> str:
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    def line(r):
        return "  ".join(str(c).rjust(w) if i in right else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


# ---------------------------------------------------------------------------
# commands (each imports what it needs, so `check` never pays for torch)


@command("build", "compile spec files into checkpoints (with surgery when a spec changed)")
def cmd_build(args) -> int:
    from .workflow.build import build

    report = build(args.paths or None, out=args.out, dry_run=args.dry_run, allow_lossy=args.allow_lossy,
                   seed=args.seed, progress=not args.json)
    if args.json:
        emit_json(report)
    else:
        print(report["text"])
    return report["exit"]


@command("inspect", "print a checkpoint's embedded spec and its parameters")
def cmd_inspect(args) -> int:
    from .checkpoint import META_VERSION, check_against, load_spec, read_header
    from .ir import build_graph
    from .spec.canonical import canonical

    header = read_header(args.checkpoint)
    spec = load_spec(header)
    graph = build_graph(spec)
    check_against(header, graph)
    params = [(name, list(node.params[local].shape), _numel(node.params[local].shape))
              for name, (node, local) in graph.parameters().items()]
    if args.json:
        emit_json({"checkpoint": args.checkpoint, "model": spec.model.name,
                   "version": header.metadata.get(META_VERSION), "spec": canonical(spec),
                   "parameters": [{"name": n, "shape": s, "count": c} for n, s, c in params],
                   "total": sum(c for _, _, c in params)})
        return 0
    print(f"# {args.checkpoint}: model {spec.model.name}, written by specsurgery {header.metadata.get(META_VERSION)}")
    print(canonical(spec))
    rows = [[n, "x".join(map(str, s)), f"{c:,}"] for n, s, c in params]
    rows.append(["total", "", f"{sum(c for _, _, c in params):,}"])
    print(table(rows, ["parameter", "shape", "count"], right=(2,)))
    return 0


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


@command("schema", "print the JSON Schema that observation records must satisfy")
def cmd_schema(args) -> int:
    from .features import record_schema
    from .spec.load import load

    loaded = load([args.spec])
    names = ", ".join(loaded.schemas)
    if not loaded.schemas:
        raise UserError(f"{args.spec}: error: no schema in this file")
    if args.schema:
        if args.schema not in loaded.schemas:
            raise UserError(f"{args.spec}: error: no schema {args.schema!r} (schemas: {names})")
        schema = loaded.schemas[args.schema]
    elif len(loaded.schemas) == 1:
        schema = next(iter(loaded.schemas.values()))
    else:
        raise UserError(f"{args.spec}: error: several schemas; choose one with --schema ({names})")
    json.dump(record_schema(schema), sys.stdout, indent=None if args.json else 2)
    sys.stdout.write("\n")
    return 0


# ---------------------------------------------------------------------------


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

    p = add("build")
    p.add_argument("paths", nargs="*", metavar="PATH", help="spec files or folders (default: the policy's spec folder, specs/)")
    p.add_argument("--out", metavar="DIR", help="checkpoint folder (default: the policy's model folder, models/)")
    p.add_argument("--dry-run", action="store_true", help="print what would be done; write nothing")
    p.add_argument("--allow-lossy", action="store_true", default=None, help="carry out surgery that does not preserve the function")
    p.add_argument("--seed", type=int, default=0, help="seed of fresh parameters (default 0)")

    p = add("inspect")
    p.add_argument("checkpoint", metavar="CHECKPOINT")

    p = add("schema")
    p.add_argument("spec", metavar="SPEC")
    p.add_argument("--schema", metavar="NAME", help="which schema, when the file has several")

    for extra in EXTRA_PARSERS:
        extra(add)
    return parser


# Later stages register their own sub-commands here (map, plan, apply, verify, check).
EXTRA_PARSERS: list[Callable] = []


OPTIONAL = {"torch": "torch", "matplotlib": "plot"}  # optional module -> the extra that installs it


def main(argv: Optional[list[str]] = None) -> int:
    from . import commands  # noqa: F401  (registers map, plan, apply, verify, check)

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
