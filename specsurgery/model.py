"""`ss.Model`: a compiled spec as a standard torch.nn.Module.

One submodule per statement, one sub-submodule per op with parameters, so
`state_dict()` keys are the checkpoint's keys (`hero_h.linear.weight` is
submodule `hero_h`, its op `linear`, parameter `weight`) and every tool that
walks modules (functional_call, DDP, FSDP, torch.compile) sees an ordinary
module tree. Each statement's ops run inside its own module's forward, so a
wrapper put around a statement (FSDP) is called when that statement runs.

A statement or op may not take a name the module tree already uses for
something else (`forward`, `training`, `features`): the spec check refuses it
at its line (names.py holds the list).

Recurrent models run one time step at a time, the whole graph per step, with
each recurrent op's state carried between steps: one call over T steps does
exactly the computation of T calls of one step, so a rollout worker stepping
the policy gets the very numbers training saw.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Iterable, Mapping, Optional, Union

import torch
from torch import nn

from .errors import UserError
from .ir import Graph, build_graph
from .ops import INPUT_OPS, OPS, Node, RunContext

# safetensors dtype names <-> torch dtypes, for the floating dtypes a model may hold
DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


class OpModule(nn.Module):
    """The parameters of one op (`hero_h.linear`): `weight`, `bias`, ..."""


class StatementModule(nn.Module):
    """One statement: its ops (children, by their names in the statement) and
    the graph nodes it computes, in order."""

    def __init__(self, nodes: list[Node], release: Optional[Mapping[int, tuple[int, ...]]] = None):
        super().__init__()
        self._ss_nodes = nodes
        self._ss_release = release or {}  # node -> own values nothing reads after it (release_after)

    def forward(self, values: dict[int, torch.Tensor], ctx: RunContext) -> dict[int, torch.Tensor]:
        """The values of this statement's nodes that later statements or heads
        read, from `values` (node -> tensor) of those before it."""
        own: dict[int, torch.Tensor] = {}
        for node in self._ss_nodes:
            xs = [own[i] if i in own else values[i] for i in node.inputs]
            params = {}
            if node.params:
                op_module = self._modules[local_scope(node)]
                # getattr, not _parameters: functional_call swaps tensors in by attribute
                params = {local: getattr(op_module, local) for local in node.params}
            own[node.index] = OPS[node.op].forward(node, params, xs, ctx)
            del xs
            for done in self._ss_release.get(node.index, ()):
                del own[done]
        return own


def statement_nodes(graph: Graph) -> dict[str, list[Node]]:
    """Statement -> the nodes it computes, in order (inputs are no statement's)."""
    by_statement: dict[str, list[Node]] = {name: [] for name in graph.statements}
    for node in graph.nodes:
        if node.op not in INPUT_OPS:
            by_statement[node.statement].append(node)
    return by_statement


def forward_bytes(graph: Graph, itemsize: int) -> int:
    """The most a forward pass holds at once per observation, beyond its inputs:
    the values still to be read (released as Model.forward does), plus one
    temporary of the size of the value being made."""
    entities = {g.name: g.entities for g in graph.entity_sets()}

    def size(node: Node) -> int:
        return node.value.width * entities.get(node.value.entities, 1) * itemsize

    by_statement = statement_nodes(graph)
    inside, after = release_after(graph, by_statement)
    live = peak = 0
    for statement, nodes in by_statement.items():
        for node in nodes:
            live += size(node)
            peak = max(peak, live + size(node))
            live -= sum(size(graph.nodes[i]) for i in inside[statement].get(node.index, ()))
        live -= sum(size(graph.nodes[i]) for i in after[statement] if graph.nodes[i].op not in INPUT_OPS)
    return peak


def release_after(graph: Graph, by_statement: Mapping[str, list[Node]]) -> tuple[dict, dict]:
    """When each value can be let go, so a forward pass holds only the values
    still to be read (a whole step's activations of a large model do not fit):
    (statement -> {node: own values read by nothing after it}, statement ->
    values of earlier statements or inputs read by nothing after it). Heads
    are kept."""
    readers: dict[int, list[Node]] = {}
    for nodes in by_statement.values():
        for node in nodes:
            for i in node.inputs:
                readers.setdefault(i, []).append(node)
    statement_of = {n.index: n.statement for nodes in by_statement.values() for n in nodes}
    heads = set(graph.outputs.values())
    inside: dict[str, dict[int, list[int]]] = {name: {} for name in by_statement}
    after: dict[str, list[int]] = {name: [] for name in by_statement}
    order = {name: k for k, name in enumerate(by_statement)}
    for index, nodes in readers.items():
        if index in heads:
            continue
        last = max(nodes, key=lambda n: (order[n.statement], n.index))
        if statement_of.get(index) == last.statement:  # read only inside its own statement
            inside[last.statement].setdefault(last.index, []).append(index)
        else:
            after[last.statement].append(index)
    return ({s: {n: tuple(v) for n, v in d.items()} for s, d in inside.items()},
            {s: tuple(v) for s, v in after.items()})


def local_scope(node: Node) -> str:
    """An op's name inside its statement: `linear` of `hero_h.linear`."""
    return node.scope.split(".", 1)[1]


def mask_key(group: str) -> str:
    """The input key of an entity set's mask (1 for a real entity, 0 for padding)."""
    return f"{group}#mask"


class Model(nn.Module):
    """A compiled spec. Build one with `ss.compile` or `ss.load`.

    `model(inputs)` returns one tensor per head; a recurrent model called with
    `state=` returns `(heads, new_state)`.
    """

    def __init__(self, graph: Graph, *, seed: Optional[int] = 0,
                 tensors: Optional[Callable[[str], torch.Tensor]] = None,
                 metadata: Optional[Mapping[str, str]] = None):
        """Parameters start at each op's seeded init, or, with `tensors`, are
        taken from `tensors(checkpoint_name)` as they are (dtype and device kept)."""
        super().__init__()
        self._ss_graph = graph
        self._ss_metadata = dict(check_metadata(metadata or {}))
        generator = torch.Generator().manual_seed(seed) if tensors is None and seed is not None else None
        by_statement = statement_nodes(graph)
        inside, self._ss_release = release_after(graph, by_statement)
        for statement, nodes in by_statement.items():
            module = StatementModule(nodes, inside[statement])
            for node in nodes:
                if not node.params:
                    continue
                op_module = OpModule()
                for local, spec in node.params.items():
                    if tensors is not None:
                        tensor = tensors(f"{node.scope}.{local}")
                    else:
                        tensor = torch.empty(spec.shape)
                        if generator is not None:
                            with torch.no_grad():
                                OPS[node.op].init(node, local, tensor, generator)
                    op_module.register_parameter(local, nn.Parameter(tensor))
                module.add_module(local_scope(node), op_module)
            self.add_module(statement, module)

    # -- what the model is -------------------------------------------------

    @property
    def name(self) -> str:
        return self._ss_graph.model.name

    @property
    def spec(self) -> str:
        """The canonical spec text (what a checkpoint embeds)."""
        from .spec.canonical import canonical

        return canonical(self._ss_graph.spec)

    @property
    def features(self) -> list[str]:
        """Input features in schema order, named as in the interaction map."""
        return list(self._ss_graph.features.names)

    @property
    def heads(self) -> list[str]:
        return list(self._ss_graph.outputs)

    @property
    def metadata(self) -> dict[str, str]:
        """The user's metadata: written by `save`, kept through surgery."""
        return dict(self._ss_metadata)

    def extra_repr(self) -> str:
        return f"model {self.name}: {len(self.features)} input features, heads {', '.join(self.heads)}"

    # -- running -----------------------------------------------------------

    def forward(self, inputs: dict[str, torch.Tensor], state: Optional[dict] = None):
        graph = self._ss_graph
        if not graph.has_time:
            if state is not None:
                raise UserError(f"error: model {self.name} has no recurrent state: call it without state=")
            return self._ss_step(inputs, {})[0]
        steps = _time_steps(graph, inputs)
        carried = self._ss_state_by_scope(state) if state is not None else {}
        outputs = []
        for t in range(steps):
            heads, carried = self._ss_step({k: v[:, t:t + 1] for k, v in inputs.items()}, carried)
            outputs.append(heads)
        heads = {h: torch.cat([o[h] for o in outputs], dim=1) for h in graph.outputs}
        if state is None:
            return heads
        return heads, self._ss_state_by_statement(carried)

    def _ss_step(self, inputs: dict[str, torch.Tensor], state: dict) -> tuple[dict, dict]:
        graph = self._ss_graph
        try:
            ctx = RunContext(masks={g.name: inputs[mask_key(g.name)] for g in graph.entity_sets()},
                             training=self.training)
            values: dict[int, torch.Tensor] = {}
            for node in graph.nodes:
                if node.op in INPUT_OPS:
                    op = OPS[node.op]
                    values[node.index] = op.forward(node, {}, [inputs[op.input_key(node)]], ctx)
        except KeyError as e:
            raise UserError(f"error: model {self.name}: the inputs have no {e.args[0]!r} "
                            "(build them with model.inputs or model.featurise)") from None
        ctx.state = state
        try:
            for statement in graph.statements:
                values.update(self._modules[statement](values, ctx))
                for done in self._ss_release[statement]:
                    del values[done]
        except (IndexError, RuntimeError):
            # embed / onehot met an index outside its vocabulary: say which input
            from .features import explain_bad_indices

            explain_bad_indices(graph.schema, inputs)
            raise
        return {h: values[i] for h, i in graph.outputs.items()}, ctx.new_state

    # -- recurrent state ---------------------------------------------------

    def initial_state(self, batch_size: int) -> dict[str, dict[str, torch.Tensor]]:
        """The zero state: statement -> `op.name` -> tensor [batch, units]
        (`{"core": {"lstm.h": ..., "lstm.c": ...}}`)."""
        if not self._ss_graph.has_time:
            raise UserError(f"error: model {self.name} has no recurrent op, so no state")
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 0:
            raise UserError(f"error: initial_state takes a batch size (a whole number), got {batch_size!r}")
        out: dict[str, dict[str, torch.Tensor]] = {}
        for node in _recurrent_nodes(self._ss_graph):
            for part in OPS[node.op].recurrent_state:
                out.setdefault(node.statement, {})[f"{local_scope(node)}.{part}"] = torch.zeros(
                    batch_size, node.value.width, dtype=model_dtype(self), device=model_device(self))
        return out

    def _ss_state_by_scope(self, state: dict) -> dict[str, dict[str, torch.Tensor]]:
        expected = self.initial_state(0)
        if not isinstance(state, Mapping) or set(state) != set(expected):
            got = sorted(state) if isinstance(state, Mapping) else type(state).__name__
            raise UserError(f"error: model {self.name}: state= must be a dict keyed by {sorted(expected)} "
                            f"(from model.initial_state or a previous call), got {got}")
        out: dict[str, dict[str, torch.Tensor]] = {}
        for node in _recurrent_nodes(self._ss_graph):
            parts = state[node.statement]
            for part in OPS[node.op].recurrent_state:
                key = f"{local_scope(node)}.{part}"
                if not isinstance(parts, Mapping) or key not in parts:
                    raise UserError(f"error: model {self.name}: state[{node.statement!r}] has no {key!r}")
                out.setdefault(node.scope, {})[part] = parts[key]
        return out

    def _ss_state_by_statement(self, carried: dict) -> dict[str, dict[str, torch.Tensor]]:
        out: dict[str, dict[str, torch.Tensor]] = {}
        for node in _recurrent_nodes(self._ss_graph):
            for part, tensor in carried[node.scope].items():
                out.setdefault(node.statement, {})[f"{local_scope(node)}.{part}"] = tensor
        return out

    # -- inputs ------------------------------------------------------------

    def featurise(self, records: Iterable, *, validate: bool = True) -> dict[str, torch.Tensor]:
        """JSON-like records (as `specsurgery schema` describes them) -> inputs,
        on the model's device, numeric features in its dtype. A recurrent model
        takes, per batch item, a list of observations (one per time step)."""
        from .features import featurise

        return featurise(self._ss_graph.schema, records, time=self._ss_graph.has_time, validate=validate,
                         dtype=model_dtype(self), device=model_device(self))

    def inputs(self, columns: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Arrays (numpy or torch) -> inputs: the fast path of a training loop."""
        from .features import inputs_from_columns

        return inputs_from_columns(self._ss_graph.schema, columns, time=self._ss_graph.has_time,
                                   dtype=model_dtype(self), device=model_device(self))

    # -- saving ------------------------------------------------------------

    def save(self, path: str, *, optimizer=None, metadata: Optional[Mapping[str, str]] = None,
             max_shard_size: Optional[Union[int, str]] = None) -> str:
        """Write a checkpoint every command accepts, atomically (a temporary file
        beside `path`, renamed into place). `metadata` (strings) is added to
        `model.metadata` and kept in the file; both survive surgery.
        With `max_shard_size` (bytes, or "2GB"), `path` is a folder in the
        Hugging Face sharded layout (specsurgery.shards). With `optimizer`, its
        state goes beside it as `<stem>.optimizer.safetensors`
        (optimizer_state.py), written first: an optimizer that cannot be saved
        leaves no file changed."""
        from .checkpoint import write_checkpoint

        if optimizer is not None:
            from .optimizer_state import save_optimizer

            save_optimizer(optimizer, self, path)

        extra = {**self._ss_metadata, **check_metadata(metadata or {})}
        state = self.state_dict()
        shapes = {k: tuple(t.shape) for k, t in state.items()}
        dtypes = {k: dtype_name(t.dtype, k) for k, t in state.items()}
        if max_shard_size is not None:
            from .shards import write_sharded

            write_sharded(path, self.spec, self.name, shapes, state.items(), max_shard_size, dtypes=dtypes,
                          extra_metadata=extra)
            return path
        write_checkpoint(path, self.spec, self.name, shapes, state.items(), dtypes=dtypes, extra_metadata=extra)
        return path


def _recurrent_nodes(graph: Graph) -> list[Node]:
    return [n for n in graph.nodes if OPS[n.op].recurrent_state]


def _first_parameter(module: nn.Module) -> Optional[torch.Tensor]:
    """next(module.parameters()), without its generators (a tenth of the time;
    model.inputs asks it twice per call): the same pre-order, own parameters first."""
    for p in module._parameters.values():
        if p is not None:
            return p
    for child in module._modules.values():
        p = _first_parameter(child) if child is not None else None
        if p is not None:
            return p
    return None


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of a model's (first) parameter: what its inputs are made in."""
    p = _first_parameter(model)
    return p.dtype if p is not None else torch.get_default_dtype()


def model_device(model: nn.Module) -> torch.device:
    p = _first_parameter(model)
    return p.device if p is not None else torch.device("cpu")


def _time_steps(graph: Graph, inputs: dict) -> int:
    first = graph.schema.groups[0].name
    tensor = inputs.get(first) if isinstance(inputs, Mapping) else None
    if tensor is None or tensor.dim() < 2:
        raise UserError(f"error: model {graph.model.name} is recurrent: inputs[{first!r}] must have a time axis "
                        "after the batch ([B, T, ...])")
    return tensor.shape[1]


def dtype_name(dtype: torch.dtype, what: str = "tensor") -> str:
    if dtype not in DTYPE_NAMES:
        raise UserError(f"error: {what} is {dtype}; a checkpoint holds float32, bfloat16, float16 or float64")
    return DTYPE_NAMES[dtype]


RESERVED_METADATA = ("specsurgery.", "format")


def check_metadata(metadata: Mapping) -> dict[str, str]:
    if not isinstance(metadata, Mapping):
        raise UserError(f"error: metadata must be a dict of strings, got {type(metadata).__name__}")
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise UserError(f"error: metadata must map strings to strings; {key!r}: {value!r} does not")
        if key.startswith(RESERVED_METADATA[0]) or key == RESERVED_METADATA[1]:
            raise UserError(f"error: metadata key {key!r} is specsurgery's own; choose another")
    return dict(metadata)


def model_of(spec, *, seed: int = 0) -> Model:
    """A fresh model of a ModelSpec."""
    return Model(build_graph(spec), seed=seed)


def load_model(path: str, *, device=None, dtype=None) -> "Model":
    """The ss.Model of a checkpoint; tensors keep the file's dtype unless `dtype` is given."""
    import torch

    from .checkpoint import Header, check_against, load_spec, open_tensors, read_header, read_tensor, user_metadata
    from .ir import build_graph

    if dtype is not None and dtype not in DTYPE_NAMES:
        raise UserError(f"error: dtype must be one of torch.float32, bfloat16, float16, float64, got {dtype!r}")
    try:
        device = torch.device(device) if device is not None else None
    except (RuntimeError, TypeError) as e:
        raise UserError(f"error: not a device: {device!r} ({e})") from None
    path = os.fspath(path)
    header = read_header(path)
    graph = build_graph(load_spec(header))
    check_against(header, graph)
    if isinstance(header, Header):  # one file: each tensor read straight into its buffer
        def get(name: str):
            return read_tensor(header, name)
    else:  # a sharded folder or a DCP checkpoint
        get = open_tensors(path).get_tensor

    def tensor(name: str):
        t = get(name)
        return t.to(device=device, dtype=dtype) if device is not None or dtype is not None else t

    return Model(graph, tensors=tensor, metadata=user_metadata(header))
