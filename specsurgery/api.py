"""The public functions of `import specsurgery as ss`: models from specs and
checkpoints (compile, load). Every mistake a user can make raises ss.SpecError
or ss.UserError, whose str() is what the command prints."""
from __future__ import annotations

import contextlib
import os
from typing import Optional

from .errors import UserError
from .spec import model as m


SEEDS = range(1 << 63)  # what torch's generators take, from the command line and from Python alike


def check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise UserError(f"error: seed must be a whole number, got {seed!r}")
    if seed not in SEEDS:
        raise UserError(f"error: {seed} is not a seed: seeds run from 0 to {SEEDS[-1]}")
    return seed


def read_spec(source: str, model: Optional[str] = None) -> m.ModelSpec:
    """The ModelSpec of `source`: a .spec path, spec text, or git:REV:path."""
    loaded, name = _read(source, model)
    return loaded.models[name]


def read_graph(source: str, model: Optional[str] = None):
    """The checked IR graph of `source` (read as read_spec reads it), as loading built it."""
    loaded, name = _read(source, model)
    return loaded.graphs[name]


def _read(source: str, model: Optional[str]):
    from .spec.load import load, load_text

    if not isinstance(source, (str, os.PathLike)):
        raise UserError(f"error: a spec is a .spec path, spec text or git:REV:path, got {type(source).__name__}")
    source = os.fspath(source)
    where = source
    if source.startswith("git:"):
        from .workflow.git import reader_at, split_git_path

        rev, path = split_git_path(source)
        loaded = load([source], reader=reader_at(rev))
    elif "\n" in source or "{" in source:
        where = "<string>"
        loaded = load_text(source, where)
    elif source.endswith(".safetensors"):
        raise UserError(f"{source}: error: this is a checkpoint, not a spec: load it with ss.load")
    elif not os.path.exists(source):
        raise UserError(f"{source}: error: no such file")
    else:
        loaded = load([source])
    names = ", ".join(loaded.models) or "none"
    if model is None:
        if len(loaded.models) != 1:
            raise UserError(f"{where}: error: {len(loaded.models)} models in this spec; choose one with model= "
                            f"(models: {names})")
        return loaded, next(iter(loaded.models))
    if model not in loaded.models:
        raise UserError(f"{where}: error: no model {model!r} (models: {names})")
    return loaded, model


def compile(source: str, model: Optional[str] = None, *, seed: int = 0):
    """A fresh ss.Model of a spec, parameters at each op's seeded init."""
    from .ir import build_graph
    from .model import Model

    return Model(build_graph(read_spec(source, model)), seed=check_seed(seed))


def load(path: str, *, device=None, dtype=None):
    """The ss.Model of a checkpoint; tensors keep the file's dtype unless `dtype` is given."""
    from .model import load_model

    return load_model(path, device=device, dtype=dtype)


# ---------------------------------------------------------------------------
# surgery


def _graph_of(source, model: Optional[str] = None):
    """A Model, a checkpoint, a .spec path, spec text, git:REV:path, a typed
    spec or its graph -> its IR graph: the one loading built (not built again)."""
    import sys

    from .ir import Graph, build_graph
    from .sources import is_checkpoint

    if isinstance(source, Graph):
        return source
    if isinstance(source, m.ModelSpec):
        return build_graph(source)
    built = sys.modules.get(f"{__package__}.model")  # not imported (it imports torch): no Model exists
    if built is not None and isinstance(source, built.Model):
        return source._ss_graph
    if isinstance(source, (str, os.PathLike)) and is_checkpoint(os.fspath(source)):
        from .checkpoint import load_graph, read_header

        return load_graph(read_header(os.fspath(source)))
    return read_graph(source, model)


class Plan:
    """The surgery from one version to another: what every weight becomes.

    `function_preserving`, `summary` (old_params, new_params, transferred,
    zeroed, fresh, dropped), `reasons` (each with file, line, column: why the
    function is not preserved), `to_json()` and `Plan.from_json(text)`."""

    def __init__(self, plan):
        self._plan = plan  # surgery.plan.Plan, the data

    @property
    def function_preserving(self) -> bool:
        return self._plan.summary.function_preserving

    @property
    def summary(self):
        return self._plan.summary

    @property
    def reasons(self) -> tuple:
        return self._plan.summary.reasons

    @property
    def only_old(self) -> list[str]:
        return list(self._plan.old_only_heads)

    @property
    def only_new(self) -> list[str]:
        return list(self._plan.new_only_heads)

    def to_json(self) -> str:
        return self._plan.model_dump_json(indent=1)

    @classmethod
    def from_json(cls, text: str, where: str = "plan") -> "Plan":
        """A plan from its JSON, checked against the published JSON Schema (and,
        when it is used, against both specs)."""
        import json

        import jsonschema
        import pydantic

        from .surgery.plan import Plan as PlanData, plan_json_schema

        try:
            data = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError, TypeError, RecursionError) as e:
            raise UserError(f"{where}: error: not JSON ({e})") from None
        validator = jsonschema.Draft202012Validator(plan_json_schema())
        try:
            error = jsonschema.exceptions.best_match(validator.iter_errors(data))
        except RecursionError:
            raise UserError(f"{where}: error: not a valid plan: nested too deep") from None
        if error is not None:
            path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path) or "(plan)"
            raise UserError(f"{where}: error: not a valid plan: {path.lstrip('.')}: {error.message}")
        try:
            return cls(PlanData.model_validate(data))
        except pydantic.ValidationError as e:  # what the JSON Schema lets through (1e308 as a whole number)
            first = e.errors()[0]
            path = ".".join(str(p) for p in first["loc"]) or "(plan)"
            raise UserError(f"{where}: error: not a valid plan: {path}: {first['msg']}") from None

    def __str__(self) -> str:
        from .surgery.plan import render_plan

        return render_plan(self._plan)

    def __repr__(self) -> str:
        s = self.summary
        return (f"<ss.Plan {self._plan.old_model} -> {self._plan.new_model}: {s.transferred:,} of {s.old_params:,} "
                f"transferred, {'function preserved' if s.function_preserving else 'function NOT preserved'}>")


def plan(old, new, *, model: Optional[str] = None) -> Plan:
    """The surgery from `old` to `new` (each a Model, a checkpoint, a .spec path,
    spec text or git:REV:path; `model` picks one in a file with several)."""
    from .surgery.diff import make_plan

    return Plan(make_plan(_graph_of(old, model), _graph_of(new, model)))


def _checked_plan(given: Optional[Plan], old_graph, new_graph) -> Plan:
    from .surgery.diff import check_plan, make_plan

    if given is None:
        return Plan(make_plan(old_graph, new_graph))
    if not isinstance(given, Plan):
        raise UserError(f"error: plan= takes an ss.Plan (ss.plan or ss.Plan.from_json), got {type(given).__name__}")
    check_plan(given._plan, old_graph, new_graph)
    return given


def refuse_lossy(p: Plan, allow_lossy: bool, what: str = "surgery") -> None:
    """A plan that does not preserve the function is carried out only when asked."""
    if p.function_preserving or allow_lossy:
        return
    lines = [f"error: the {what} does not preserve the function; allow it with allow_lossy=True "
             "(--allow-lossy), or change the spec lines to blame:"]
    lines += [f"  {r.render()}" for r in p.reasons]
    raise UserError("\n".join(lines))


def refuse_by_policy(p: Plan, policy, checkpoint: str) -> None:
    """The project's rule for carrying out a change (workflow.policy), as build applies it."""
    from .workflow.policy import policy_verdict

    problems = policy_verdict(p.summary, policy)
    if problems:
        lines = [f"{checkpoint}: error: refused surgery:"] + [f"  {problem}" for problem in problems]
        lines += [f"  {r.render()}" for r in p.reasons]
        raise UserError("\n".join(lines))


class Surgery:
    """What ss.surgery made: `.model` (a new ss.Model), `.plan` (the plan carried
    out) and `.optimizer` (None: no optimizer was given)."""

    def __init__(self, model, plan: Plan, optimizer=None):
        self.model, self.plan, self.optimizer = model, plan, optimizer

    def __repr__(self) -> str:
        return f"<ss.Surgery {self.plan!r}>"


def surgery(model, new, *, optimizer=None, plan: Optional[Plan] = None, allow_lossy: bool = False,
            seed: int = 0) -> Surgery:
    """Carry `model` over to the spec `new`, in memory: a new ss.Model whose weights
    are the plan's (old ones copied, new ones zero or fresh), on the old model's
    device and in its dtype. The old model is left as it was. Fresh values are
    those `ss.apply` writes with the same seed."""
    import torch

    from .model import Model, model_device, model_dtype
    from .surgery.apply import build_tensor, fresh_generator, fresh_init

    if not isinstance(model, Model):
        raise UserError(f"error: ss.surgery takes an ss.Model, got {type(model).__name__} (for a checkpoint file, "
                        "ss.load it or use ss.apply)")
    check_seed(seed)
    named = None
    if optimizer is not None:  # an optimizer that cannot be carried is refused before anything is built
        from .optimizer_state import named_state

        named = named_state(optimizer, model)
    old_graph = model._ss_graph
    new_graph = _graph_of(new)
    carried = _checked_plan(plan, old_graph, new_graph)
    refuse_lossy(carried, allow_lossy)
    old = dict(model.named_parameters())
    entries = {p.name: p for p in carried._plan.params}
    dtype, device = model_dtype(model), model_device(model)

    def tensor(name: str) -> torch.Tensor:
        entry = entries[name]
        source = old.get(entry.source) if entry.source is not None else None
        init = fresh_init(new_graph, name, fresh_generator(seed, name))
        with torch.no_grad():
            return build_tensor(entry, lambda n: old[n].detach(), init,
                                dtype=source.dtype if source is not None else dtype,
                                device=source.device if source is not None else device)

    new_model = Model(new_graph, tensors=tensor, metadata=model.metadata)
    new_model.train(model.training)
    new_optimizer = None
    if named is not None:  # the optimizer's state moves with the weights, by the same plan
        from .optimizer_state import build_optimizer, carry

        new_optimizer = build_optimizer(carry(named, carried._plan), new_model)
    return Surgery(new_model, carried, new_optimizer)


def apply(checkpoint: str, new, out: str, *, plan: Optional[Plan] = None, allow_lossy: bool = False,
          seed: int = 0, max_shard_size=None, jobs: Optional[int] = None, progress=None, fsync: bool = True) -> Plan:
    """Carry a checkpoint over to `new`, file to file, streaming tensor by tensor
    (the new file appears whole or not at all). User metadata and each tensor's
    dtype are kept. With `max_shard_size`, or from a sharded checkpoint, `out` is
    a sharded folder; from a DCP folder, a DCP folder, with the optimizer state
    in it carried by the same plan. A list of checkpoints (of one spec) is planned once and
    applied in worker processes (`jobs`), each written as OUT/<its name>; the
    ones that fail are named in one UserError, the others are written whole.

    Every file is fsynced before it is renamed into place, so the new
    checkpoint survives a power cut. `fsync=False` skips that (the data may
    still be in the page cache when apply returns, as after `cp`); each file is
    still written beside its place and renamed, so a killed process leaves
    nothing half-written."""
    check_seed(seed)
    if isinstance(checkpoint, (list, tuple)):
        return _apply_many(checkpoint, new, out, plan=plan, allow_lossy=allow_lossy, seed=seed, jobs=jobs,
                           fsync=fsync)
    return apply_checkpoint(checkpoint, new, out, plan=plan, allow_lossy=allow_lossy, seed=seed,
                            max_shard_size=max_shard_size, jobs=jobs, progress=progress, fsync=fsync)[0]


def _apply_many(checkpoints, new, out: str, *, plan, allow_lossy: bool, seed: int, jobs, fsync: bool = True) -> Plan:
    from .checkpoint import load_graph, read_header
    from .many_apply import apply_many

    checkpoints = [os.fspath(c) for c in checkpoints]
    if not checkpoints:
        raise UserError("error: ss.apply was given an empty list of checkpoints")
    carried = _checked_plan(plan, load_graph(read_header(checkpoints[0])), _graph_of(new))
    refuse_lossy(carried, allow_lossy)
    failed = [o for o in apply_many(carried._plan, checkpoints, os.fspath(out), jobs=jobs, seed=seed, durable=fsync)
              if o.error]
    if failed:
        raise UserError("\n".join([o.error for o in failed] + [f"{len(checkpoints) - len(failed)} of {len(checkpoints)} "
                                                              "checkpoints carried over; the others are whole"]))
    return carried


def apply_checkpoint(checkpoint: str, new, out: str, *, plan: Optional[Plan] = None, allow_lossy: bool = False,
                     seed: int = 0, max_shard_size=None, jobs: Optional[int] = None,
                     progress=None, policy=None, fsync: bool = True) -> tuple[Plan, dict]:
    """ss.apply, and what the writer reports (bytes, tensors; shards and jobs for a folder).
    With a `policy` (the command's), the plan must pass it as build's must."""
    from .checkpoint import load_graph, read_header
    from .dcp import is_dcp
    from .early_copy import early_output
    from .shards import is_folder_checkpoint

    checkpoint, out = os.fspath(checkpoint), os.fspath(out)
    header = read_header(checkpoint)
    new_graph = _graph_of(new)
    sharded = max_shard_size is not None or (is_folder_checkpoint(checkpoint) and not out.endswith(".safetensors"))
    if sharded and out.endswith(".safetensors"):
        raise UserError(f"{out}: error: a sharded checkpoint is a folder; name it without .safetensors")
    if is_dcp(checkpoint) or os.path.abspath(out) == os.path.abspath(header.path):
        early = contextlib.nullcontext()
    else:  # the new files laid out and old tensors copied into them while this thread plans
        early = early_output(header, new_graph, out, sharded, max_shard_size, durable=fsync)
    with early as started:
        carried = _checked_plan(plan, load_graph(header), new_graph)
        if policy is None:
            refuse_lossy(carried, allow_lossy)
        else:
            refuse_by_policy(carried, policy, checkpoint)
        if sharded and is_dcp(checkpoint):  # a DCP folder stays one, its optimizer state inside it
            from .dcp import apply_dcp

            return carried, apply_dcp(carried._plan, checkpoint, new_graph, out, max_shard_size=max_shard_size,
                                      jobs=jobs, seed=seed, checked=True, durable=fsync)
        new_optimizer = _carried_optimizer(carried._plan, checkpoint)  # before anything is written
        if sharded:
            from .shard_apply import apply_sharded

            written = apply_sharded(carried._plan, checkpoint, new_graph, out, max_shard_size=max_shard_size,
                                    jobs=jobs, seed=seed, checked=True, durable=fsync, early=started)
        else:
            from .shard_apply import default_jobs
            from .surgery.apply import apply_plan

            written = apply_plan(carried._plan, checkpoint, new_graph, out, seed=seed, progress=progress,
                                 checked=True, durable=fsync, threads=jobs or default_jobs(), early=started)
    if new_optimizer is not None:  # beside the new checkpoint
        from .checkpoint import optimizer_path
        from .optimizer_state import write_optimizer

        written["optimizer"] = write_optimizer(optimizer_path(out), new_optimizer, carried._plan.new_spec,
                                               durable=fsync)
    return carried, written


def _carried_optimizer(plan, checkpoint: str):
    """The optimizer state that goes along with `checkpoint` (in its DCP folder, or
    in the file beside it), moved by the same plan; None when there is none."""
    from .checkpoint import optimizer_path
    from .dcp import is_dcp

    if is_dcp(checkpoint):
        from .dcp import carried_optimizer

        return carried_optimizer(plan, checkpoint)
    if os.path.exists(optimizer_path(checkpoint)):
        from .optimizer_state import carried_optimizer_file

        return carried_optimizer_file(plan, checkpoint)
    return None


def verify(old, new, *, states: int = 1000, records=None, tolerance: float = 1e-5, seed: int = 0,
           steps: Optional[int] = None):
    """Run `old` and `new` (each an ss.Model or a checkpoint path) on the same
    states and compare their heads output by output, in float64. The states are
    random (`states` of them), or the caller's `records` of the old schema."""
    from .surgery.verify import verify_models

    return verify_models(_model_of(old), _model_of(new), states=states, records=records, tolerance=tolerance,
                         seed=check_seed(seed), steps=steps)


def _model_of(source):
    from .model import Model

    if isinstance(source, Model):
        return source
    if isinstance(source, (str, os.PathLike)):
        return load(source)
    raise UserError(f"error: ss.verify takes ss.Models or checkpoint paths, got {type(source).__name__}")
