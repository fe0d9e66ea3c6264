"""The sub-commands: each a runner (arguments -> exit status) and its parser.

Each registers its runner in COMMANDS and its parser in PARSERS; heavy imports
(torch) stay inside the runners that need them, so `check` never pays for torch.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Callable

from .render import apply_text, emit_json, table
from .errors import UserError
from .progress import Progress


def seed(text: str) -> int:
    """A --seed: a whole number torch's generator takes (api.SEEDS, as for ss.compile(seed=))."""
    from .api import check_seed

    value = int(text)  # argparse turns a ValueError into "invalid seed value"
    try:
        return check_seed(value)
    except UserError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("error: ")) from None


COMMANDS: dict[str, Callable] = {}
PARSERS: list[Callable] = []  # each adds its sub-command(s) through `add(name)`


def command(name: str, help: str):
    def register(fn):
        fn.help = help
        COMMANDS[name] = fn
        return fn

    return register


# ---------------------------------------------------------------------------
# build, inspect, schema


@command("build", "compile spec files into checkpoints (with surgery when a spec changed)")
def cmd_build(args) -> int:
    from .workflow.build import build

    report = build(args.paths or None, out=args.out, dry_run=args.dry_run, allow_lossy=args.allow_lossy,
                   seed=args.seed, progress=not args.json, max_shard_size=args.max_shard_size,
                   announce=None if args.json else lambda text: print(text, file=sys.stderr, flush=True))
    if args.json:
        emit_json(report)
    else:
        print(report["text"])
        if report["errors"]:
            print(report["errors"], file=sys.stderr)
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


def _first_parsers(add) -> None:
    p = add("build")
    p.add_argument("paths", nargs="*", metavar="PATH", help="spec files or folders (default: the policy's spec folder, specs/)")
    p.add_argument("--out", metavar="DIR", help="checkpoint folder (default: the policy's model folder, models/)")
    p.add_argument("--dry-run", action="store_true", help="print what would be done; write nothing")
    p.add_argument("--allow-lossy", action="store_true", default=None, help="carry out surgery that does not preserve the function")
    p.add_argument("--seed", type=seed, default=0, help="seed of fresh parameters (default 0)")
    p.add_argument("--max-shard-size", metavar="SIZE", help="write each model as DIR/<model>/, sharded in the "
                   "Hugging Face layout, shards up to SIZE (bytes, or 2GB, 400MiB)")

    p = add("inspect")
    p.add_argument("checkpoint", metavar="CHECKPOINT")

    p = add("schema")
    p.add_argument("spec", metavar="SPEC")
    p.add_argument("--schema", metavar="NAME", help="which schema, when the file has several")


PARSERS.append(_first_parsers)


# ---------------------------------------------------------------------------


def _model_arg(p) -> None:
    p.add_argument("--model", metavar="M", help="which model, when the file has several")


# ---------------------------------------------------------------------------
# map


@command("map", "print the interaction map: which parameters each input feature touches")
def cmd_map(args) -> int:
    from .ir import build_graph
    from .spec.load import load
    from .backends.shadow import group_rows, shadow_map

    spec = load([args.spec]).model(args.model, where=args.spec)
    graph = build_graph(spec)
    phi = shadow_map(graph)
    if args.method == "boolean":
        rows = group_rows(phi, per_feature=args.features)
        pairs = phi.pair_count()
    else:
        from .backends.probe import gradient_map
        from .mapping import gradient_rows

        gmap = gradient_map(graph, args.method)
        rows = gradient_rows(graph, gmap, per_feature=args.features)
        pairs = gmap.pair_count()
    summary = {"model": spec.model.name, "method": args.method, "features": len(graph.features),
               "parameters": graph.parameter_count(), "interactions": pairs,
               "boolean_interactions": phi.pair_count()}
    summary["found"] = pairs / summary["boolean_interactions"] if summary["boolean_interactions"] else 1.0
    if args.plot:
        from .mapping import plot_map

        plot_map(phi if args.method == "boolean" else gmap, args.plot, title=f"{spec.model.name}: {args.method} map")
        summary["plot"] = args.plot
    if args.json:
        emit_json({**summary, "groups": rows})
        return 0
    print(f"model {spec.model.name}: {summary['features']:,} input features, {summary['parameters']:,} parameters, "
          f"{pairs:,} (feature, element) interactions by {args.method}"
          + ("" if args.method == "boolean" else f" = {100 * summary['found']:.2f}% of the boolean map's"))
    body = []
    for row in rows:
        shown = row["slices"] or ["(nothing)"]
        label = row["features"] + ("" if args.features else f" ({row['count']} features)")
        body.append([label, f"{row['elements']:,}", shown[0]])
        body.extend(["", "", s] for s in shown[1:])
    print(table(body, ["features", "elements", "parameter slices"], right=(1,)))
    if args.plot:
        print(f"wrote {args.plot}")
    return 0


def _map_parser(add) -> None:
    p = add("map")
    p.add_argument("spec", metavar="SPEC")
    _model_arg(p)
    p.add_argument("--method", choices=["boolean", "gradient", "gradient-random", "gradient-positive"],
                   default="boolean",
                   help="boolean: the shadow graph, exact and fast (default). The paper's gradient probe, one "
                        "input feature on at a time, a non-zero gradient marks an interaction (needs torch): "
                        "gradient: positive weights, max-pools read as average pools, tanh and sigmoid inputs "
                        "normalised so none saturates (the paper's method); "
                        "gradient-random: the model's own random init, pools as written (ReLUs on negative "
                        "inputs hide interactions); gradient-positive: positive weights, max-pools kept (a max "
                        "picks one entity and hides the rest)")
    p.add_argument("--features", action="store_true", help="one row per feature instead of per group")
    p.add_argument("--plot", metavar="FILE.png", help="draw the map: features down, parameters across")


PARSERS.append(_map_parser)


# ---------------------------------------------------------------------------
# plan, apply, verify


def read_plan_file(path: str):
    """An ss.Plan from a JSON file, validated against the published schema."""
    from .api import Plan
    from .spec.load import read_disk

    text = read_disk(path, what="plan file")  # a regular file (not a FIFO), UTF-8
    try:
        return Plan.from_json(text, where=path)
    except RecursionError:
        raise UserError(f"{path}: error: not a valid plan: nested too deeply") from None


@command("plan", "work out the surgery from one spec version to another")
def cmd_plan(args) -> int:
    import json

    from .api import plan
    from .files import atomic_file
    from .surgery.plan import plan_json_schema

    if args.schema:
        emit_json(plan_json_schema())
        return 0
    if not args.old or not args.new:
        args.usage_error("plan needs OLD and NEW (or --schema)")
    result = plan(args.old, args.new, model=args.model)
    if args.output:
        with atomic_file(args.output, "w") as f:
            f.write(result.to_json())
    if args.json:
        emit_json(json.loads(result.to_json()))
    else:
        print(result)
        if args.output:
            print(f"wrote {args.output}")
    return 0


@command("apply", "carry checkpoints over to a new spec (each with the optimizer file beside it)")
def cmd_apply(args) -> int:
    try:
        return _apply(args)
    except UserError as e:  # "the plan ..." with no file named: the plan file is meant
        if args.plan and str(e).startswith("error: the plan"):
            raise UserError(f"{args.plan}: {e}") from None
        raise


def _apply(args) -> int:
    from .api import apply_checkpoint, plan, read_graph, refuse_by_policy
    from .workflow.policy import load_policy

    new = read_graph(args.new_spec, args.model) if args.model else args.new_spec
    given = read_plan_file(args.plan) if args.plan else None
    args.checkpoint = args.checkpoints[0]  # the plan is made once, from the first
    policy = load_policy().override(allow_lossy=args.allow_lossy, min_transfer=args.min_transfer)  # build's rule
    if len(args.checkpoints) > 1:
        many = given or plan(args.checkpoint, new)
        refuse_by_policy(many, policy, args.checkpoint)
        return _apply_many(args, many._plan)
    progress = Progress("apply", 0, enabled=not args.json)
    try:
        result, written = apply_checkpoint(args.checkpoint, new, args.output, plan=given,
                                           policy=policy, seed=args.seed,
                                           max_shard_size=args.max_shard_size, jobs=args.jobs, progress=progress,
                                           fsync=args.fsync)
    finally:
        progress.close()
    s = result.summary
    if args.json:
        emit_json({**written, **s.model_dump(), "transfer_share": s.transfer_share})
    else:
        print(apply_text(args.output, s))
    return 0


def _apply_many(args, plan) -> int:
    from .many_apply import apply_many

    if args.max_shard_size is not None:
        raise UserError("error: --max-shard-size takes one checkpoint; several are each written as they are")
    outcomes = apply_many(plan, args.checkpoints, args.output, jobs=args.jobs, seed=args.seed, durable=args.fsync)
    failed = [o for o in outcomes if o.error]
    if args.json:
        emit_json({"outputs": [o.__dict__ for o in outcomes], "failed": len(failed), **plan.summary.model_dump()})
    else:
        for o in outcomes:
            if not o.error:
                print(f"wrote {o.output}" + (f" and {o.optimizer}" if o.optimizer else ""))
        s = plan.summary
        print(f"{len(outcomes) - len(failed)} of {len(outcomes)} checkpoints carried over: {s.transferred:,} of "
              f"{s.old_params:,} old parameters transferred each; function "
              + ("preserved" if s.function_preserving else "NOT preserved"))
    for o in failed:
        print(o.error, file=sys.stderr)
    return 1 if failed else 0


@command("verify", "run two checkpoints on the same states and compare their heads")
def cmd_verify(args) -> int:
    from .api import verify
    from .workflow.policy import load_policy

    states = args.states if args.states is not None else load_policy().verify_states
    result = verify(args.old, args.new, states=states, tolerance=args.tol, seed=args.seed, steps=args.steps)
    if args.json:
        emit_json(result.report())
    else:
        print(result)
    return 0 if result.ok else HEADS_DIFFER


HEADS_DIFFER = 3  # verify's own: the models differ (1 stays "the input is bad", as everywhere)


def share(text: str) -> float:
    """--min-transfer: a share of the old parameters, 0 to 1."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a share between 0 and 1")
    return value


def _positive_int(text: str) -> int:
    import argparse

    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return int(text)


DEFAULT_STATES = 1000  # workflow.policy.DEFAULT_STATES (not imported here: help must stay cheap)


def _surgery_parsers(add) -> None:
    p = add("plan")
    p.add_argument("old", nargs="?", metavar="OLD", help="old version: a .spec file, a checkpoint, or git:REV:path")
    p.add_argument("new", nargs="?", metavar="NEW", help="new version: likewise")
    _model_arg(p)
    p.add_argument("-o", "--output", metavar="plan.json", help="also write the plan as JSON")
    p.add_argument("--schema", action="store_true", help="print the plan's JSON Schema")

    p = add("apply")
    p.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT",
                   help="checkpoints of one spec (several: one plan, applied in worker processes)")
    p.add_argument("new_spec", metavar="NEW_SPEC", help="a .spec file or git:REV:path")
    p.add_argument("-o", "--output", metavar="OUT", required=True,
                   help="the new checkpoint (with several checkpoints: a folder, each written under its name)")
    _model_arg(p)
    p.add_argument("--plan", metavar="plan.json", help="apply this plan (validated) instead of planning anew")
    p.add_argument("--seed", type=seed, default=0, help="seed of fresh parameters (default 0)")
    p.add_argument("--allow-lossy", action="store_true", default=None,
                   help="carry out a change that does not preserve the function (default: the policy's allow_lossy)")
    p.add_argument("--min-transfer", type=share, default=None, metavar="SHARE",
                   help="least share of old parameters to carry over (default: the policy's min_transfer, 0.9)")
    p.add_argument("--max-shard-size", metavar="SIZE", help="write OUT as a sharded folder (Hugging Face layout) "
                   "of shards up to SIZE (bytes, or 2GB, 400MiB; default for a sharded input: its largest shard)")
    p.add_argument("--jobs", type=_positive_int, default=None, metavar="N",
                   help="worker processes writing shards or checkpoints; for one file, threads writing its "
                        "tensors (default: one per core)")
    p.add_argument("--no-fsync", dest="fsync", action="store_false",
                   help="do not fsync the files written (by default each is fsynced before its rename, so it "
                        "survives a power cut); each file is still written beside its place and renamed, so a "
                        "killed apply leaves nothing half-written")

    p = add("verify")
    p.add_argument("old", metavar="OLD_CKPT")
    p.add_argument("new", metavar="NEW_CKPT")
    p.add_argument("--states", type=_positive_int, default=None, metavar="N",
                   help=f"random states (default: the policy's verify_states, {DEFAULT_STATES:,} unless set)")
    p.add_argument("--steps", type=_positive_int, default=None, metavar="T",
                   help="observations per state for recurrent models (default 3)")
    p.add_argument("--tol", type=float, default=1e-5, help="largest allowed difference (default 1e-5)")
    p.add_argument("--seed", type=seed, default=0,
                   help="seed of the random states (default 0): the same seed gives the same states")


PARSERS.append(_surgery_parsers)


# ---------------------------------------------------------------------------
# check (the pre-commit hook)


@command("check", "pre-commit hook: can each staged spec change be carried out?")
def cmd_check(args) -> int:
    from .workflow.check import check
    from .workflow.policy import load_policy

    policy = load_policy().override(allow_lossy=args.allow_lossy, min_transfer=args.min_transfer)
    report = check(args.files or None, policy=policy)
    if args.json:
        emit_json({k: v for k, v in report.items() if k != "text"})
    else:
        stream = sys.stderr if report["exit"] else sys.stdout
        print(report["text"], file=stream)
    return report["exit"]


def _check_parser(add) -> None:
    p = add("check")
    p.add_argument("files", nargs="*", metavar="FILE", help="spec files (default: every staged .spec)")
    p.add_argument("--allow-lossy", action="store_true", default=None, help="allow changes that do not preserve the function")
    p.add_argument("--min-transfer", type=share, default=None, metavar="SHARE", help="least share of old parameters to carry over")


PARSERS.append(_check_parser)
