"""An optimizer's state keyed by parameter name: carried through surgery by the
plan, and kept on disk beside a checkpoint as `<stem>.optimizer.safetensors`.

torch keys an optimizer's state by position in its param groups; here it is
keyed by the model's parameter names (`hero_h.linear.weight`), the names the
plan speaks. Each moment is a tensor of its parameter's shape, so it moves
element by element with that parameter, by the same run copier
(surgery/apply.copy_runs). Elements no run reaches start by the rule of their
optimizer (RULES; the README's "Optimizers" section says why each).

On disk: one safetensors file, tensors named `<parameter>/<state key>`
(`hero_h.linear.weight/exp_avg`, `.../step`), the class, defaults and param
groups (hyperparameters, parameters by name) as JSON in its metadata, with the
hash of the spec it was saved for. Nothing is pickled.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from typing import Optional

import torch

from .checkpoint import optimizer_path  # noqa: F401  (the file's name, no torch)
from .errors import UserError

# How the elements of a moment that no run copies start:
ZERO = "zero"  # a running mean of gradients (or momentum) with no history is zero
MEAN = "mean"  # a second moment: the mean over the parameter's copied elements (see README)
INITIAL = "initial_accumulator_value"  # Adagrad's own start for a sum of squares

# Per supported class: each per-element state key and its rule. `step` (one
# scalar per parameter in torch) is kept from the old parameter. `fresh`: what a
# parameter with no copied element gets: "start" leaves its state empty, so the
# optimizer starts it exactly as it starts any parameter (Adam: its own step
# count from 0, bias correction exact); "group mean" gives its second moment
# the mean over its group's carried parameters (RMSprop has no bias correction:
# its own start makes the first step 1/sqrt(1 - alpha) = 10 times the normal one).
RULES: dict[str, dict] = {
    "Adam": {"moments": {"exp_avg": ZERO, "exp_avg_sq": MEAN, "max_exp_avg_sq": MEAN}, "fresh": "start"},
    "AdamW": {"moments": {"exp_avg": ZERO, "exp_avg_sq": MEAN, "max_exp_avg_sq": MEAN}, "fresh": "start"},
    "SGD": {"moments": {"momentum_buffer": ZERO}, "fresh": "start"},
    "RMSprop": {"moments": {"square_avg": MEAN, "momentum_buffer": ZERO, "grad_avg": ZERO}, "fresh": "group mean"},
    "Adagrad": {"moments": {"sum": INITIAL}, "fresh": "start"},
}
SCALAR_KEYS = ("step",)
PENDING_KEY = "new_elements"  # on disk: 1 where a second moment waits for its element's first gradient
SUPPORTED = ", ".join(f"torch.optim.{c}" for c in RULES)

META_CLASS = "specsurgery.optimizer.class"
META_DEFAULTS = "specsurgery.optimizer.defaults"
META_GROUPS = "specsurgery.optimizer.param_groups"
META_EMPTY = "specsurgery.optimizer.empty"  # state entries that are None (SGD's buffer before momentum)
META_SPEC_HASH = "specsurgery.optimizer.spec_sha256"


def spec_sha256(spec_text: str) -> str:
    return hashlib.sha256(spec_text.encode()).hexdigest()


@dataclass
class NamedState:
    """An optimizer with every parameter named: what is carried and stored."""

    cls: str
    defaults: dict
    groups: list[tuple[dict, list[str]]]  # (hyperparameters, parameter names), in order
    state: dict[str, dict] = field(default_factory=dict)  # name -> state key -> tensor or None
    # name -> the elements whose second moments wait for their first gradient (in memory only)
    pending: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def rule(self) -> dict:
        return RULES[self.cls]


def _class_name(optimizer) -> str:
    cls = type(optimizer)
    if cls.__module__.startswith("torch.optim") and cls.__name__ in RULES and getattr(torch.optim, cls.__name__) is cls:
        return cls.__name__
    raise UserError(f"error: cannot carry the state of optimizer {cls.__module__}.{cls.__qualname__} through "
                    f"surgery; supported: {SUPPORTED}")


# ---------------------------------------------------------------------------
# optimizer <-> named state


def named_state(optimizer, model) -> NamedState:
    """`optimizer`'s groups and state, its parameters named as in `model`."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise UserError(f"error: optimizer= takes a torch.optim.Optimizer, got {type(optimizer).__name__}")
    cls = _class_name(optimizer)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = []
    state: dict[str, dict] = {}
    allowed = set(RULES[cls]["moments"]) | set(SCALAR_KEYS)
    for group in optimizer.param_groups:
        members = []
        for p in group["params"]:
            if id(p) not in names:
                raise UserError(f"error: the optimizer holds a tensor of shape {list(p.shape)} that is not a "
                                f"parameter of model {model.name}")
            name = names[id(p)]
            members.append(name)
            entries = optimizer.state.get(p)
            if entries:
                unknown = sorted(set(entries) - allowed)
                if unknown:
                    raise UserError(f"error: optimizer torch.optim.{cls} keeps state {', '.join(map(repr, unknown))} "
                                    f"for {name}, which specsurgery does not know how to carry")
                state[name] = dict(entries)
        groups.append(({k: v for k, v in group.items() if k != "params"}, members))
    return NamedState(cls, dict(optimizer.defaults), groups, state, _pending_by_name(optimizer, names))


def _pending_by_name(optimizer, names: dict[int, str]) -> dict[str, torch.Tensor]:
    """The masks of elements still waiting for their first gradient, by
    parameter name. A sharded one (a DTensor) is kept even when its elements
    have all been seen on this rank: every rank must save the same names."""
    waiting = getattr(optimizer, "_ss_awaiting_gradient", {})
    return {names[id(p)]: mask.clone() for p, mask in waiting.items()
            if id(p) in names and (_is_sharded(mask) or mask.any())}


def _is_sharded(t) -> bool:
    return hasattr(t, "to_local")  # a DTensor (fully_shard), without importing torch.distributed.tensor


def _local(t):
    """This rank's elements of a DTensor (a view: writes go through), or `t` itself."""
    return t.to_local() if _is_sharded(t) else t


def build_optimizer(named: NamedState, model):
    """A torch optimizer of `named`'s class, groups and state over `model`'s parameters."""
    params = dict(model.named_parameters())
    cls = getattr(torch.optim, named.cls)
    groups = [{**hyper, "params": [params[n] for n in members]} for hyper, members in named.groups]
    optimizer = cls(groups)  # every group carries all its hyperparameters; defaults are the saved ones
    optimizer.defaults.clear()
    optimizer.defaults.update(named.defaults)
    for name, entries in named.state.items():
        optimizer.state[params[name]] = dict(entries)
    if named.pending:
        _start_at_first_gradient(optimizer, {params[n]: mask.to(params[n].device).clone()
                                             for n, mask in named.pending.items()},
                                 [k for k, rule in named.rule["moments"].items() if rule == MEAN])
    return optimizer


def _start_at_first_gradient(optimizer, pending: dict, keys: list[str]) -> None:
    """Set each new element's second moment to the square of its first non-zero
    gradient, just before the step that uses it: the element then starts as if
    it had seen that gradient since step 1, which is what the shared step
    count's bias correction assumes, so its first updates are as large as a
    settled element's (at most lr), not sqrt(1/(1 - beta2)) times larger. The
    hook removes itself once every new element has had a gradient."""

    def hook(opt, args, kwargs):
        with torch.no_grad():
            for p, mask in list(pending.items()):
                if p.grad is None or p not in opt.state:
                    continue
                # under fully_shard each rank sets its own elements (local views of the DTensors)
                waiting, grad = _local(mask), _local(p.grad)
                seen = waiting & (grad != 0)
                if seen.any():
                    square = grad[seen].to(torch.float64).square()
                    for key in keys:
                        if opt.state[p].get(key) is not None:
                            moment = _local(opt.state[p][key])
                            moment[seen] = square.to(moment.dtype)
                    waiting &= ~seen
                if not waiting.any() and not _is_sharded(mask):  # a sharded mask stays: see _pending_by_name
                    del pending[p]
        if not pending:
            handle.remove()

    handle = optimizer.register_step_pre_hook(hook)
    optimizer._ss_awaiting_gradient = pending  # saved with the state (PENDING_KEY), so a reload keeps waiting


# ---------------------------------------------------------------------------
# optimizer <-> named state on the ranks of a job: through
# torch.distributed.checkpoint.state_dict, whose fully-qualified parameter names
# are the model's own (fully_shard keeps them; DDP's `module.` is left out)


def named_from_state_dict(optimizer, model) -> NamedState:
    """`optimizer`'s state by get_optimizer_state_dict: on each rank, its shard
    (DTensors) under fully_shard, the whole state under DDP or in one process."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    if not isinstance(optimizer, torch.optim.Optimizer):
        raise UserError(f"error: optimizer= takes a torch.optim.Optimizer, got {type(optimizer).__name__}")
    cls = _class_name(optimizer)
    names = {id(p): n for n, p in model.named_parameters()}
    if not optimizer.state:  # no step yet; get_optimizer_state_dict would take a zero one (step counts 0 -> 1)
        return named_state(optimizer, model)
    osd = get_optimizer_state_dict(model, optimizer)
    allowed = set(RULES[cls]["moments"]) | set(SCALAR_KEYS)
    state = {}
    for name, entries in osd["state"].items():
        unknown = sorted(set(entries) - allowed)
        if unknown:
            raise UserError(f"error: optimizer torch.optim.{cls} keeps state {', '.join(map(repr, unknown))} "
                            f"for {name}, which specsurgery does not know how to carry")
        state[name] = dict(entries)
    groups = [({k: v for k, v in g.items() if k != "params"}, list(g["params"])) for g in osd["param_groups"]]
    return NamedState(cls, dict(optimizer.defaults), groups, state, _pending_by_name(optimizer, names))


def set_from_named(optimizer, model, named: NamedState, where: str) -> None:
    """Set `optimizer` (built over `model`'s parameters, sharded or not) to
    `named` in place by set_optimizer_state_dict: state, and each group's
    hyperparameters. Its class and groups must be the saved ones."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    if not isinstance(optimizer, torch.optim.Optimizer):
        raise UserError(f"error: optimizer= takes a torch.optim.Optimizer, got {type(optimizer).__name__}")
    cls = _class_name(optimizer)
    if cls != named.cls:
        raise UserError(f"{where}: error: the checkpoint holds the state of torch.optim.{named.cls}; "
                        f"the optimizer given is a torch.optim.{cls}")
    names = {id(p): n for n, p in model.named_parameters()}
    mine = [[names.get(id(p)) for p in g["params"]] for g in optimizer.param_groups]
    if any(n is None for members in mine for n in members):
        raise UserError(f"error: the optimizer holds a tensor that is not a parameter of model {model.name}")
    if [sorted(m) for m in mine] != [sorted(members) for _, members in named.groups]:
        def show(groups):
            return "; ".join(f"group {k}: {', '.join(sorted(m)) or 'none'}" for k, m in enumerate(groups))

        raise UserError(f"{where}: error: the optimizer's param groups are not the checkpoint's: it has "
                        f"{show(mine)}, the checkpoint {show([m for _, m in named.groups])}")
    osd = {"state": {n: dict(e) for n, e in named.state.items()},
           "param_groups": [{**hyper, "params": list(members)} for hyper, members in named.groups]}
    # strict=False: a parameter new in surgery has no state; the optimizer starts it as any parameter
    set_optimizer_state_dict(model, optimizer, osd, options=StateDictOptions(strict=False))
    optimizer.defaults.clear()
    optimizer.defaults.update(named.defaults)
    if named.pending:
        params = dict(model.named_parameters())
        _start_at_first_gradient(optimizer, {params[n]: mask for n, mask in named.pending.items()},
                                 [k for k, rule in named.rule["moments"].items() if rule == MEAN])


# ---------------------------------------------------------------------------
# through surgery


def _moved(entry, old: torch.Tensor, rule: str, hyper: dict) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """One moment in the parameter's new shape: each copied element where the
    plan puts it (apply.copy_runs, the parameters' own copier), the others by
    `rule`; and the mask of the copied elements (None: all of them)."""
    from .surgery.apply import copy_runs

    if entry.action == "copied":
        return old.clone(), None
    new = copy_runs(entry, old, torch.zeros(tuple(entry.shape), dtype=old.dtype, device=old.device))
    copied = copy_runs(entry, torch.ones(old.shape, dtype=torch.bool, device=old.device),
                       torch.zeros(tuple(entry.shape), dtype=torch.bool, device=old.device))
    if rule == ZERO:
        return new, copied
    if rule == INITIAL:
        value = float(hyper.get("initial_accumulator_value", 0.0))
    else:  # MEAN: a stand-in until the element's first gradient (_start_at_first_gradient)
        value = float(new[copied].double().mean())
    new[~copied] = value
    return new, copied


def carry(named: NamedState, plan) -> NamedState:
    """`named` (over the plan's old parameters) carried to the new parameters."""
    rule = named.rule
    old_params = {p.source for p in plan.params if p.source is not None} | {d.name for d in plan.dropped}
    in_optimizer = {n for _, members in named.groups for n in members}
    group_of = {n: k for k, (_, members) in enumerate(named.groups) for n in members}
    covers_all = old_params <= in_optimizer
    statement_group = {}
    for n, k in group_of.items():
        statement_group.setdefault(n.split(".", 1)[0], k)

    members: list[list[str]] = [[] for _ in named.groups]
    state: dict[str, dict] = {}
    pending: dict[str, torch.Tensor] = {}
    fresh_params = []
    for entry in plan.params:
        if entry.source is not None and entry.source in group_of:
            k = group_of[entry.source]
        elif entry.source is None and entry.name.split(".", 1)[0] in statement_group:
            k = statement_group[entry.name.split(".", 1)[0]]  # a new parameter joins its statement's group
        elif entry.source is None and covers_all and named.groups:
            k = 0
        else:
            continue  # its old parameter was not trained by this optimizer (frozen): neither is it
        members[k].append(entry.name)
        old_state = named.state.get(entry.source) if entry.source is not None else None
        if not old_state:
            continue
        if entry.copied == 0:
            fresh_params.append((entry, k, old_state))
            continue
        hyper = named.groups[k][0]
        new = {}
        for key, value in old_state.items():
            if key in SCALAR_KEYS or value is None:
                new[key] = value.clone() if isinstance(value, torch.Tensor) else value
            else:
                new[key], copied = _moved(entry, value, rule["moments"][key], hyper)
                if rule["moments"][key] == MEAN and copied is not None and not copied.all():
                    pending[entry.name] = ~copied
        state[entry.name] = new
    if rule["fresh"] == "group mean":
        _start_at_group_mean(named, plan, members, state, fresh_params)
        pending.update({entry.name: torch.ones(tuple(entry.shape), dtype=torch.bool) for entry, _, _ in fresh_params})
    return NamedState(named.cls, dict(named.defaults), [(dict(h), m) for (h, _), m in zip(named.groups, members)],
                      state, pending)


def _start_at_group_mean(named, plan, members, state, fresh_params) -> None:
    """Parameters with nothing copied (RMSprop): second moments at the mean of
    their group's carried ones, first moments zero, the group's step count."""
    entries = {p.name: p for p in plan.params}
    for entry, k, old_state in fresh_params:
        carried = [state[n] for n in members[k] if n in state]
        new = {}
        for key, value in old_state.items():
            if value is None:
                new[key] = None
            elif key in SCALAR_KEYS:
                new[key] = max((s[key] for s in carried), default=value).clone()
            elif named.rule["moments"][key] == MEAN and carried:
                values = torch.cat([s[key].flatten().double() for s in carried])
                new[key] = torch.full(tuple(entries[entry.name].shape), float(values.mean()), dtype=value.dtype,
                                      device=value.device)
            else:
                new[key] = torch.zeros(tuple(entries[entry.name].shape), dtype=value.dtype, device=value.device)
        state[entry.name] = new


def carry_optimizer(optimizer, old_model, new_model, plan):
    """The optimizer over `new_model`'s parameters that `optimizer` (over
    `old_model`'s) becomes by `plan`: same class, groups and hyperparameters."""
    return build_optimizer(carry(named_state(optimizer, old_model), plan), new_model)


# ---------------------------------------------------------------------------
# on disk


def _encode(value):
    if isinstance(value, torch.Tensor):  # a tensor hyperparameter (lr=torch.tensor(...))
        return {"tensor": value.tolist()}
    if isinstance(value, (list, tuple)):
        return [_encode(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return {"float": repr(value)}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise UserError(f"error: an optimizer hyperparameter is a {type(value).__name__} ({value!r}); "
                    "only numbers, strings, booleans and tuples of them can be saved")


def _decode(value):
    if isinstance(value, dict) and set(value) == {"tensor"}:
        return torch.tensor(value["tensor"])
    if isinstance(value, dict) and set(value) == {"float"}:
        return float(value["float"])
    if isinstance(value, list):
        return tuple(_decode(v) for v in value)  # betas and the like are tuples in torch
    return value


def stored_tensors(named: NamedState) -> tuple[dict[str, torch.Tensor], list[str]]:
    """`named`'s tensors as stored, `<parameter>/<state key>` (DTensors stay
    DTensors), and the names of its empty (None) entries."""
    tensors, empty = {}, []
    for name, entries in named.state.items():
        for key, value in entries.items():
            if value is None:
                empty.append(f"{name}/{key}")
            elif isinstance(value, torch.Tensor):
                tensors[f"{name}/{key}"] = value.detach()
            else:  # a plain number (a step count kept as a float)
                tensors[f"{name}/{key}"] = torch.tensor(float(value), dtype=torch.float32)
    for name, mask in named.pending.items():
        tensors[f"{name}/{PENDING_KEY}"] = mask.to(torch.float32)
    return tensors, empty


def stored_metadata(named: NamedState, spec_text: str, empty: list[str]) -> dict[str, str]:
    """Class, defaults, param groups (hyperparameters, parameters by name) as JSON strings."""
    return {
        META_CLASS: named.cls,
        META_DEFAULTS: json.dumps({k: _encode(v) for k, v in named.defaults.items()}),
        META_GROUPS: json.dumps([{**{k: _encode(v) for k, v in hyper.items()}, "params": members}
                                 for hyper, members in named.groups]),
        META_EMPTY: json.dumps(empty),
        META_SPEC_HASH: spec_sha256(spec_text),
    }


def write_optimizer(path: str, named: NamedState, spec_text: str, durable: bool = True) -> str:
    """Write `named` to `path` atomically, laid out as checkpoints are (the same
    state gives the same bytes, in any process)."""
    from .checkpoint import write_checkpoint
    from .model import dtype_name

    tensors, empty = stored_tensors(named)
    write_checkpoint(path, None, None, {k: tuple(t.shape) for k, t in tensors.items()}, tensors.items(),
                     extra_metadata=stored_metadata(named, spec_text, empty), durable=durable,
                     dtypes={k: dtype_name(t.dtype, f"optimizer state {k}") for k, t in tensors.items()})
    return path


def read_optimizer(path: str, spec_text: str, shapes: dict[str, tuple[int, ...]]) -> NamedState:
    """The named state in `path`, checked against the spec and the parameter
    shapes (name -> shape) of the model it must belong to."""
    from .checkpoint import read_header

    header = read_header(path, embedded_spec=False)  # sanity of the table, no torch, no pickle
    if not header.tensors:
        return read_stored(path, header.metadata, {}, spec_text, shapes, None)
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:  # the header read above is checked; no tensor read before its checks
        return read_stored(path, header.metadata, header.tensors, spec_text, shapes,
                           lambda names: {n: f.get_tensor(n) for n in names})


def read_stored(path: str, meta: dict, infos: dict, spec_text: str, shapes: dict[str, tuple[int, ...]],
                read_tensors) -> NamedState:
    """The named state stored as `meta` (stored_metadata) and tensors `infos`
    (name -> TensorInfo: dtype, whole shape), each checked against the spec and
    the parameter shapes (name -> shape) before read_tensors(names) reads them
    all (name -> tensor). One file and a DCP folder (dcp.py) are read by these
    same checks."""
    def bad(why: str) -> UserError:
        return UserError(f"{path}: error: not a valid optimizer file: {why}")

    if META_CLASS not in meta:
        raise bad("it has no optimizer class in its metadata (not written by specsurgery)")
    cls = meta[META_CLASS]
    if cls not in RULES:
        raise UserError(f"{path}: error: optimizer class {cls!r} is not supported; supported: {SUPPORTED}")
    if meta.get(META_SPEC_HASH) != spec_sha256(spec_text):
        raise UserError(f"{path}: error: this optimizer state was saved for another spec than the model's "
                        "(written by another version of the model?)")
    try:
        defaults = {k: _decode(v) for k, v in json.loads(meta.get(META_DEFAULTS, "{}")).items()}
        raw_groups = json.loads(meta[META_GROUPS])
        empty = json.loads(meta.get(META_EMPTY, "[]"))
    except (KeyError, json.JSONDecodeError, AttributeError, TypeError):
        raise bad("its param groups are not valid JSON") from None
    if not isinstance(raw_groups, list) or not all(isinstance(g, dict) and isinstance(g.get("params"), list)
                                                   for g in raw_groups):
        raise bad("its param groups are not a list of groups with parameter names")
    groups, seen = [], set()
    for g in raw_groups:
        members = g["params"]
        for n in members:
            if not isinstance(n, str) or n not in shapes:
                raise UserError(f"{path}: error: the optimizer state names parameter {n!r}, which the model has not")
            if n in seen:
                raise bad(f"parameter {n!r} is in two param groups")
            seen.add(n)
        hyper = {k: _decode(v) for k, v in g.items() if k != "params"}
        for key, value in hyper.items():
            _check_hyperparameter(path, cls, len(groups), key, value)
        groups.append((hyper, list(members)))
    allowed = set(RULES[cls]["moments"]) | set(SCALAR_KEYS) | {PENDING_KEY}
    keys = list(infos) + list(empty if isinstance(empty, list) else [])
    state: dict[str, dict] = {}
    for full in keys:
        name, _, key = str(full).rpartition("/")
        if name not in seen:
            raise bad(f"state {full!r} is for a parameter of no param group")
        if key not in allowed:
            raise bad(f"state {full!r}: torch.optim.{cls} keeps no {key!r}")
        state.setdefault(name, {})[key] = None
    for full, info in infos.items():
        name, _, key = full.rpartition("/")
        want = () if key in SCALAR_KEYS else tuple(shapes[name])
        if tuple(info.shape) != want:
            raise UserError(f"{path}: error: state {full} has shape {list(info.shape)}, "
                            f"the parameter needs {list(want)}")
        if info.dtype not in ("F32", "F64", "F16", "BF16"):
            raise bad(f"state {full} is {info.dtype}, not a floating dtype")
    for full, value in (read_tensors(list(infos)) if infos else {}).items():
        name, _, key = full.rpartition("/")
        state[name][key] = value
    pending = {}
    for name, entries in state.items():
        if PENDING_KEY in entries:
            pending[name] = entries.pop(PENDING_KEY) != 0
    state = {name: entries for name, entries in state.items() if entries}
    return NamedState(cls, defaults, groups, state, pending)


def _check_hyperparameter(path: str, cls: str, group: int, key: str, value) -> None:
    """A saved hyperparameter must be of the kind torch's default is (torch checks
    few of them when a group is given, and a string lr would fail only at a step)."""
    default = getattr(torch.optim, cls)([torch.zeros(1, requires_grad=True)]).defaults.get(key, value)
    number = (int, float, torch.Tensor)

    def is_number(v) -> bool:
        return isinstance(v, number) and not isinstance(v, bool) and (not isinstance(v, torch.Tensor) or v.numel() == 1)

    if isinstance(default, bool) or default is None:
        ok = value is None or isinstance(value, bool) if default is None else isinstance(value, bool)
        kind = "true, false" + (" or null" if default is None else "")
    elif isinstance(default, tuple):
        ok = isinstance(value, tuple) and len(value) == len(default) and all(is_number(v) for v in value)
        kind = f"{len(default)} numbers"
    elif is_number(default):
        ok, kind = is_number(value), "a number"
    else:
        ok, kind = True, ""
    if not ok:
        raise UserError(f"{path}: error: not a valid optimizer file: param group {group} has {key} = {value!r}; "
                        f"torch.optim.{cls} takes {kind}")


def save_optimizer(optimizer, model, checkpoint: str) -> str:
    """Write `optimizer`'s state beside `checkpoint` (model.save(optimizer=...))."""
    return write_optimizer(optimizer_path(checkpoint), named_state(optimizer, model), model.spec)


def load_optimizer(path: str, model):
    """ss.load_optimizer: the optimizer saved beside checkpoint `path`, rebuilt over `model`'s parameters."""
    from .model import Model

    if not isinstance(model, Model):
        raise UserError(f"error: load_optimizer takes an ss.Model, got {type(model).__name__}")
    path = os.fspath(path)
    sidecar = path if path.endswith(".optimizer.safetensors") else optimizer_path(path)
    if not os.path.exists(sidecar):
        raise UserError(f"{sidecar}: error: no such file (no optimizer was saved beside {path})")
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    named = read_optimizer(sidecar, model.spec, shapes)
    device = next(model.parameters()).device if shapes else None
    if device is not None and device.type != "cpu":
        for entries in named.state.values():
            for key, value in entries.items():
                if isinstance(value, torch.Tensor) and key not in SCALAR_KEYS:
                    entries[key] = value.to(device)
    return build_optimizer(named, model)


def carried_optimizer_file(plan, checkpoint: str) -> Optional[NamedState]:
    """The optimizer file beside `checkpoint`, read, checked and carried by `plan`
    (None: there is none). Callers carry it before they write the new model, so
    a bad optimizer file leaves nothing written."""
    source = optimizer_path(checkpoint)
    if not os.path.exists(source):
        return None
    old_shapes = {p.source: tuple(p.old_shape) for p in plan.params if p.source is not None}
    old_shapes.update({d.name: tuple(d.shape) for d in plan.dropped})
    return carry(read_optimizer(source, plan.old_spec, old_shapes), plan)


def carry_optimizer_file(plan, checkpoint: str, out: str, durable: bool = True) -> Optional[str]:
    """With an optimizer file beside `checkpoint`, write the carried one beside
    `out`; returns its path, or None when there was none to carry."""
    named = carried_optimizer_file(plan, checkpoint)
    return None if named is None else write_optimizer(optimizer_path(out), named, plan.new_spec, durable=durable)
