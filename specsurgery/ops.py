"""The op registry: one definition per op, every rule it has side by side.

Each op says, in one class:
  * `infer`   its shape rule: input values and arguments -> output value and
              parameter shapes (pure Python; raises OpError naming the argument);
  * `init`    how its parameters start (seeded; also what "start fresh" means);
  * `forward` its torch computation;
  * `probe`   its gradient-map variant (positive values stay positive, zero
              stays zero, so a non-zero gradient means an interaction);
  * `shadow`  its boolean rule (paper, Tables 1 and 2): per output index the
              input features it carries and a structural key (keys.py), per
              parameter axis the same, from which the interaction map Φ is read;
  * `surgery` its surgery meaning (a `Surgery`): how its outputs depend on its
              inputs' indices, whether it maps 0 to 0 and is idempotent, what
              it needs of the input layout, how it can start at zero or as the
              identity. The function check and the plan ask this, never a name.

Every rule is required on `Op`: a method left abstract, or a `surgery` left
undeclared, fails when the class is created (at import).
torch is imported inside the torch rules only: parsing, checking, mapping and
planning run in a pre-commit hook that must not pay for `import torch`.
"""
from __future__ import annotations

import enum
import math
import operator
from itertools import chain
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Optional, Sequence

from . import keys as K

# ---------------------------------------------------------------------------
# values, parameters and shadow axes


@dataclass(frozen=True)
class Value:
    """The static type of an IR value.

    A tensor has a last axis of `width` and, when it ranges over an entity set,
    an entity axis before it. A category path is not a tensor: it carries
    indices into `vocab` and is only read by `embed` and `onehot`.
    """

    width: int
    entities: Optional[str] = None
    vocab: Optional[str] = None  # set for a category path
    label: str = ""  # how messages name it: "category hero.hero_id"
    cap: Optional[int] = None  # the entity set's size (the IR builder sets it on every value over one)

    @property
    def is_category(self) -> bool:
        return self.vocab is not None

    def describe(self) -> str:
        if self.label:
            return self.label
        kind = f"entity set {self.entities}" if self.entities else "vector"
        return f"{kind} of width {self.width}"


OUT, IN = "out", "in"  # the role of a parameter axis: units this op makes, or indices it reads


@dataclass(frozen=True)
class ParamSpec:
    shape: tuple[int, ...]
    roles: tuple[str, ...]  # one of OUT / IN per axis


@dataclass(frozen=True)
class Axis:
    """One axis seen index by index: a structural key and a feature bitset each
    (the keys a tuple, or a keys.Lazy axis read like one)."""

    keys: Sequence
    sets: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.keys)

    def union(self) -> int:
        sets = self.sets
        if sets and sets.count(sets[0]) == len(sets):  # one set at every index (a linear's units): in C
            return sets[0]
        # One object stands for many indices: each is or-ed in once, found by
        # identity (hashing a set of thousands of features costs; or-ing a
        # set in twice changes nothing).
        total = 0
        for s in dict(zip(map(id, self.sets), self.sets)).values():
            total |= s
        return total


class OpError(Exception):
    """A shape or argument error; `argument` is the index of the culprit."""

    def __init__(self, message: str, argument: Optional[int] = None):
        super().__init__(message)
        self.message = message
        self.argument = argument


@dataclass
class Node:
    """One op application in the IR graph (see ir.py)."""

    index: int
    op: str
    inputs: tuple[int, ...]
    value: Value
    attrs: dict[str, Any]
    params: dict[str, ParamSpec]
    scope: str  # parameter prefix, "hero_h.linear"; "" for ops without parameters
    statement: str
    span: Any = None
    arg_spans: tuple = ()


@dataclass
class RunContext:
    """What a forward pass needs beyond its inputs."""

    masks: dict[str, Any] = field(default_factory=dict)  # entity set -> [B, (T), E] float mask
    probe_variant: str = "gradient"  # gradient | gradient-random | gradient-positive
    # Recurrent ops (those with `recurrent_state`) start from state[scope] (name ->
    # [B, units]; absent: zeros) and leave their last step's in new_state[scope].
    state: dict[str, dict[str, Any]] = field(default_factory=dict)
    new_state: dict[str, dict[str, Any]] = field(default_factory=dict)
    training: bool = False  # the module's mode: ops that differ while training (dropout) read it


# ---------------------------------------------------------------------------
# the surgery meaning of an op


class Indices(enum.Enum):
    """How an op's output indices depend on its inputs' indices."""

    SOURCE = "source"  # reads the observation: its indices are input features
    ELEMENTWISE = "elementwise"  # output index i is made of input index i alone (a pool: over entities)
    CONCAT = "concat"  # the output's indices are the inputs' indices, one input after another
    JOIN = "join"  # output index i joins index i of each of its inputs (add, mul)
    MIXING = "mixing"  # every output index reads every input index, through the op's parameters


@dataclass(frozen=True)
class Layout:
    """What an op needs of its input's layout, and what it does to it."""

    entities: Literal["any", "required", "forbidden"]  # an entity axis on the input
    pools: bool = False  # the output loses the entity axis
    time: bool = False  # runs over a time axis: a model holding it takes [batch, time, ...]


@dataclass(frozen=True)
class Surgery:
    """An op's surgery meaning. No field that decides a claim has a default:
    an op must say whether it mixes, maps 0 to 0, or is idempotent."""

    indices: Indices
    zero_to_zero: bool  # f(0) = 0 (with its parameters as they are: a biased linear does not)
    idempotent: bool  # f(f(x)) = f(x): relu after relu is one relu
    layout: Layout
    # MIXING: with every parameter at zero the output is zero, so a new branch can start here at zero.
    starts_at_zero: bool = False
    # MIXING: an old output changes when its input axis changes, whatever the weights of new
    # inputs (layernorm's statistics); the phrase that says so ({old}, {new}: the axis sizes).
    # None: new inputs meet weights that start at zero, and old outputs do not see them.
    axis_change: Optional[str] = None
    # JOIN: the value one side can hold and leave the other as it is (add: 0; mul: 1).
    join_neutral: Optional[float] = None
    # How each parameter starts so the op computes its input unchanged (linear: weight
    # "identity", bias "zero"); None: it cannot be the identity.
    identity: Optional[Mapping[str, Literal["identity", "zero"]]] = None
    # MIXING: integer arguments whose change changes the function whatever the weights
    # (attention's head_dim scales its scores), each with the phrase that says why.
    fixed_args: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self):
        if (self.indices is Indices.JOIN) != (self.join_neutral is not None):
            raise TypeError("a join (and only a join) declares join_neutral")
        if self.indices is not Indices.MIXING and (self.starts_at_zero or self.axis_change or self.identity
                                                   or self.fixed_args):
            raise TypeError("starts_at_zero, axis_change, identity and fixed_args are for ops that mix through parameters")


def wrap_axis(op: "Op", axis: Axis) -> Axis:
    """The axis of an index-by-index op's output: each key wrapped by the op."""
    return Axis(K.wrapped_axis(op.name, axis.keys, op.surgery.idempotent), axis.sets)


def _torch():
    import torch

    return torch


# ---------------------------------------------------------------------------
# the op contract


class Op(ABC):
    name: str
    surgery: Surgery  # required: see __init_subclass__
    n_tensors: Optional[int] = 1  # tensor arguments; None: one or more
    n_ints: int = 0  # integer arguments after them (widths)
    int_names: tuple[str, ...] = ()
    keywords: dict[str, Any] = {}
    takes_category: bool = False  # reads a category path instead of a tensor
    # Names of the tensors a recurrent op carries from step to step, each [B, units]
    # (the model then takes a time axis); empty for every other op.
    recurrent_state: tuple[str, ...] = ()
    # Its output can only be a head, read by no other op (a pointer's scores are -inf at padding).
    head_only: bool = False
    # Its numeric arguments may be decimals (dropout's p); others take whole numbers.
    decimals: bool = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "name" not in cls.__dict__:
            return  # a family helper (Elementwise, Pool): each op of the family is checked
        # ABCMeta counts abstract methods only after this hook: look for them here.
        missing = sorted(name for name in Op.__abstractmethods__
                         if getattr(getattr(cls, name), "__isabstractmethod__", False))
        if missing:
            raise TypeError(f"op {cls.__name__} does not define {', '.join(missing)}")
        if not isinstance(getattr(cls, "surgery", None), Surgery):
            raise TypeError(f"op {cls.__name__} does not declare its surgery meaning (surgery = Surgery(...)): "
                            "how its outputs depend on its inputs' indices, whether it maps 0 to 0, "
                            "whether it is idempotent, what it needs of the input layout")

    @abstractmethod
    def infer(self, inputs: list[Value], ints: list[int], kw: dict[str, Any]) -> tuple[Value, dict[str, ParamSpec]]:
        ...

    @abstractmethod
    def init(self, node: Node, name: str, tensor, generator) -> None:
        ...

    @abstractmethod
    def forward(self, node: Node, params: dict, xs: list, ctx: RunContext):
        ...

    @abstractmethod
    def probe(self, node: Node, params: dict, xs: list, ctx: RunContext):
        ...

    @abstractmethod
    def shadow(self, node: Node, xs: list[Axis]) -> tuple[Axis, dict[str, tuple[Axis, ...]]]:
        ...


def _tensor_input(op: str, value: Value, argument: int = 0, allow_entities: bool = True) -> None:
    if value.is_category:
        raise OpError(f"{op} needs a numeric input, got {value.describe()}", argument)
    if not allow_entities and value.entities:
        raise OpError(f"{op} needs a plain vector, got {value.describe()} (pool it first)", argument)


def _positive_width(op: str, what: str, n: int, argument: int) -> None:
    if n <= 0:
        raise OpError(f"{op} {what} must be a positive whole number, got {n}", argument)


def _gated_bias(z, bias):
    """Probe bias: it only counts where an input reached the unit (Table 2, x + w)."""
    return z + bias * (z != 0).to(z.dtype)


def _unsaturated(z, ctx: RunContext):
    """The input of a tanh or sigmoid (a gate too) in the full probe, brought into
    (-1, 1): the paper's "normalizing the inputs into sigmoid/tanh to avoid
    saturation". Positive values grow along a probe (a layernorm's x + mean, a
    mul's a + b + ab), and in float32 tanh'(9.5) and sigmoid'(17) are exactly 0: the
    gradient would miss an interaction the boolean map has. z / (1 + |z|) keeps
    zero and sign; its divisor is not differentiated, so the slope is never
    rounded away (written out, the derivative of z / (1 + |z|) cancels to 0)."""
    if ctx.probe_variant != "gradient":
        return z
    return z / (1 + z.abs()).detach()


def _no_params(node: Node, name: str, tensor, generator) -> None:
    raise AssertionError(f"{node.op} has no parameters")


# ---------------------------------------------------------------------------
# inputs: reading the featurised observation


class GroupInput(Op):
    """`obs.group`: the group's numeric features, in schema order."""

    name = "group"
    n_tensors = 0
    surgery = Surgery(Indices.SOURCE, zero_to_zero=True, idempotent=True, layout=Layout(entities="any"))

    def infer(self, inputs, ints, kw):
        raise AssertionError("inputs are typed by the IR builder")

    init = _no_params

    def forward(self, node, params, xs, ctx):
        return xs[0]

    probe = forward

    def shadow(self, node, xs):
        return Axis(K.features(node.attrs["features"]), tuple(node.attrs["bits"])), {}

    def input_key(self, node: Node) -> str:
        """The featurised input it reads (model.inputs and featurise name them so)."""
        return node.attrs["group"]


class FeatureInput(GroupInput):
    """`obs.group.feature` for a numeric feature: a vector of width 1."""

    name = "feature"

    def forward(self, node, params, xs, ctx):
        i = node.attrs["column"]
        return xs[0][..., i : i + 1]

    probe = forward


class CategoryInput(GroupInput):
    """`obs.group.feature` for a category: indices (torch) or one-hot rows (probe)."""

    name = "category"

    def forward(self, node, params, xs, ctx):
        return xs[0]

    probe = forward

    def input_key(self, node: Node) -> str:
        return f"{node.attrs['group']}.{node.attrs['feature']}"  # a category has its own index tensor


# ---------------------------------------------------------------------------
# parameterised ops


class Linear(Op):
    name = "linear"
    n_ints = 1
    int_names = ("units",)
    keywords = {"bias": True}
    surgery = Surgery(Indices.MIXING, zero_to_zero=False, idempotent=False, layout=Layout(entities="any"),
                      starts_at_zero=True, identity={"weight": "identity", "bias": "zero"})

    def infer(self, inputs, ints, kw):
        (x,), (units,) = inputs, ints
        _tensor_input("linear", x)
        _positive_width("linear", "units", units, 1)
        params = {"weight": ParamSpec((units, x.width), (OUT, IN))}
        if kw["bias"]:
            params["bias"] = ParamSpec((units,), (OUT,))
        return Value(units, x.entities), params

    def init(self, node, name, tensor, generator):
        # nn.Linear's default: U(-1/sqrt(in), 1/sqrt(in)) for weight and bias.
        fan_in = node.params["weight"].shape[1]
        bound = 1.0 / math.sqrt(fan_in) if fan_in else 0.0
        tensor.uniform_(-bound, bound, generator=generator)

    def forward(self, node, params, xs, ctx):
        return _torch().nn.functional.linear(xs[0], params["weight"], params.get("bias"))

    def probe(self, node, params, xs, ctx):
        z = xs[0] @ params["weight"].T
        return _gated_bias(z, params["bias"]) if "bias" in params else z

    def shadow(self, node, xs):
        (x,) = xs
        units = node.params["weight"].shape[0]
        seen = x.union()  # every unit mixes every input (w ⊙ x, then a sum)
        out = Axis(K.units(node.scope, units), (seen,) * units)
        params = {"weight": (Axis(out.keys, (0,) * units), x)}
        if "bias" in node.params:
            params["bias"] = (Axis(out.keys, (seen,) * units),)
        return out, params


class Embed(Op):
    name = "embed"
    n_ints = 1
    int_names = ("dim",)
    takes_category = True
    surgery = Surgery(Indices.MIXING, zero_to_zero=True, idempotent=False, layout=Layout(entities="any"),
                      starts_at_zero=True)

    def infer(self, inputs, ints, kw):
        (x,), (dim,) = inputs, ints
        if not x.is_category:
            raise OpError(f"embed needs a category feature, got {x.describe()}", 0)
        _positive_width("embed", "dim", dim, 1)
        return Value(dim, x.entities), {"weight": ParamSpec((x.width, dim), (IN, OUT))}

    def init(self, node, name, tensor, generator):
        tensor.normal_(0.0, 1.0, generator=generator)  # nn.Embedding's default

    def forward(self, node, params, xs, ctx):
        return _torch().nn.functional.embedding(xs[0], params["weight"])

    def probe(self, node, params, xs, ctx):
        return xs[0] @ params["weight"]  # one-hot rows: all zero means "no item"

    def shadow(self, node, xs):
        (items,) = xs
        dim = node.params["weight"].shape[1]
        out = Axis(K.units(node.scope, dim), (items.union(),) * dim)
        return out, {"weight": (items, Axis(out.keys, (0,) * dim))}


class LayerNorm(Op):
    name = "layernorm"
    surgery = Surgery(Indices.MIXING, zero_to_zero=False, idempotent=False, layout=Layout(entities="any"),
                      starts_at_zero=True, axis_change="normalises over an axis that changed ({old} -> {new} indices): "
                                                  "mean and variance change")

    def infer(self, inputs, ints, kw):
        (x,) = inputs
        _tensor_input("layernorm", x)
        n = x.width
        return Value(n, x.entities), {"weight": ParamSpec((n,), (OUT,)), "bias": ParamSpec((n,), (OUT,))}

    def init(self, node, name, tensor, generator):
        tensor.fill_(1.0 if name == "weight" else 0.0)

    def forward(self, node, params, xs, ctx):
        n = node.value.width
        return _torch().nn.functional.layer_norm(xs[0], (n,), params["weight"], params["bias"])

    def probe(self, node, params, xs, ctx):
        # Every output reads every input (the mean); x + mean(x) keeps that and
        # stays positive, where (x - mean) / std would not.
        x = xs[0]
        z = (x + x.mean(dim=-1, keepdim=True)) * params["weight"]
        return _gated_bias(z, params["bias"])

    def shadow(self, node, xs):
        (x,) = xs
        n = len(x)
        seen = x.union()  # mean and variance mix the whole axis (x ⊙ x)
        out = Axis(K.normed_axis(node.scope, x.keys), (seen,) * n)
        return out, {"weight": (Axis(x.keys, (seen,) * n),), "bias": (Axis(x.keys, (seen,) * n),)}


class RecurrentCell(Op):
    """lstm and gru: one row block of weight_ih, weight_hh and the biases per gate."""

    n_ints = 1
    int_names = ("units",)
    gates: tuple[str, ...]  # PyTorch's order of the row blocks

    def infer(self, inputs, ints, kw):
        (x,), (units,) = inputs, ints
        _tensor_input(self.name, x, allow_entities=False)
        _positive_width(self.name, "units", units, 1)
        rows = len(self.gates) * units
        return Value(units), {
            "weight_ih": ParamSpec((rows, x.width), (OUT, IN)),
            "weight_hh": ParamSpec((rows, units), (OUT, IN)),
            "bias_ih": ParamSpec((rows,), (OUT,)),
            "bias_hh": ParamSpec((rows,), (OUT,)),
        }

    def init(self, node, name, tensor, generator):
        bound = 1.0 / math.sqrt(node.value.width)  # nn.LSTM's and nn.GRU's default
        tensor.uniform_(-bound, bound, generator=generator)

    def shadow(self, node, xs):
        (x,) = xs
        units = node.value.width
        # Every gate of every unit mixes all of x and all of h (and an LSTM's
        # cell all of z), so from the first step on every unit carries what x
        # carries, and weight_hh meets it from the second step: the fixpoint of
        # running the cell on sets is reached at once.
        seen = x.union()
        rows = K.chained(tuple(K.units(node.scope, units, gate) for gate in self.gates))
        hidden = Axis(K.units(node.scope, units), (seen,) * units)
        empty_rows = Axis(rows, (0,) * len(rows))
        bias_rows = Axis(rows, (seen,) * len(rows))
        params = {
            "weight_ih": (empty_rows, x),
            "weight_hh": (empty_rows, hidden),
            "bias_ih": (bias_rows,),
            "bias_hh": (bias_rows,),
        }
        return hidden, params


LSTM_GATES = ("i", "f", "g", "o")  # PyTorch's order of the four row blocks


class LSTM(RecurrentCell):
    name = "lstm"
    gates = LSTM_GATES
    # All parameters at zero: every gate is 1/2 and g = tanh(0) = 0, so c and h stay 0.
    surgery = Surgery(Indices.MIXING, zero_to_zero=False, idempotent=False,
                      layout=Layout(entities="forbidden", time=True), starts_at_zero=True)
    recurrent_state = ("h", "c")

    def forward(self, node, params, xs, ctx):
        torch = _torch()
        x = xs[0]
        batch, units = x.shape[0], node.value.width
        start = ctx.state.get(node.scope)
        if start is None:
            h0 = c0 = x.new_zeros(1, batch, units)
        else:
            h0, c0 = start["h"].unsqueeze(0), start["c"].unsqueeze(0)
        # The cell written out as PyTorch's own CPU kernel computes it. torch.lstm
        # on CPU goes through oneDNN, which copies both weight matrices into its
        # own layout at every call: 618 MB more at each step of Five's 4096-unit
        # cell, and slower.
        linear = torch.nn.functional.linear
        h, c = h0[0], c0[0]
        from_x = linear(x, params["weight_ih"], params["bias_ih"])  # [B, T, 4 units], all steps at once
        outputs = []
        for t in range(x.shape[1]):
            i, f, g, o = (linear(h, params["weight_hh"], params["bias_hh"]) + from_x[:, t]).chunk(4, dim=-1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            outputs.append(h)
        ctx.new_state[node.scope] = {"h": h, "c": c}
        return torch.stack(outputs, dim=1)

    def probe(self, node, params, xs, ctx):
        # The same cell written out, with zero-preserving gates: sigmoid(z) - 1/2.
        torch = _torch()
        x = xs[0]
        units = node.value.width
        h = x.new_zeros(x.shape[0], units)
        c = x.new_zeros(x.shape[0], units)
        bias = params["bias_ih"] + params["bias_hh"]
        outputs = []
        for t in range(x.shape[1]):
            z = x[:, t] @ params["weight_ih"].T + h @ params["weight_hh"].T
            z = _unsaturated(_gated_bias(z, bias), ctx)  # c and h stay below 1 by themselves
            i, f, g, o = z.chunk(4, dim=-1)
            i, f, o = (torch.sigmoid(v) - 0.5 for v in (i, f, o))
            c = f * c + i * torch.tanh(g)
            h = o * torch.tanh(c)
            outputs.append(h)
        return torch.stack(outputs, dim=1)


GRU_GATES = ("r", "z", "n")  # PyTorch's order of the three row blocks


class GRU(RecurrentCell):
    name = "gru"
    gates = GRU_GATES
    # All parameters at zero: r = z = 1/2 and n = tanh(0) = 0, so h' = h/2 stays 0.
    surgery = Surgery(Indices.MIXING, zero_to_zero=False, idempotent=False,
                      layout=Layout(entities="forbidden", time=True), starts_at_zero=True)
    recurrent_state = ("h",)

    def forward(self, node, params, xs, ctx):
        torch = _torch()
        x = xs[0]
        start = ctx.state.get(node.scope)
        h0 = x.new_zeros(1, x.shape[0], node.value.width) if start is None else start["h"].unsqueeze(0)
        weights = [params["weight_ih"], params["weight_hh"], params["bias_ih"], params["bias_hh"]]
        out, h = torch.gru(x, h0, weights, True, 1, 0.0, False, False, True)
        ctx.new_state[node.scope] = {"h": h[0]}
        return out

    def probe(self, node, params, xs, ctx):
        # The same cell written out with zero-preserving gates (sigmoid(z) - 1/2)
        # and h' = n + z*h: PyTorch's (1 - z)*n + z*h subtracts, which could
        # cancel a path; this one is increasing in every positive input.
        torch = _torch()
        x = xs[0]
        h = x.new_zeros(x.shape[0], node.value.width)
        outputs = []
        for t in range(x.shape[1]):
            from_x, from_h = x[:, t] @ params["weight_ih"].T, h @ params["weight_hh"].T
            reached = ((from_x + from_h) != 0).to(x.dtype)  # biases count where an input reached the unit
            from_x, from_h = from_x + params["bias_ih"] * reached, from_h + params["bias_hh"] * reached
            xr, xz, xn = from_x.chunk(3, dim=-1)
            hr, hz, hn = from_h.chunk(3, dim=-1)
            r, z = (torch.sigmoid(_unsaturated(v, ctx)) - 0.5 for v in (xr + hr, xz + hz))
            h = torch.tanh(_unsaturated(xn + r * hn, ctx)) + z * h  # h stays below 2
            outputs.append(h)
        return torch.stack(outputs, dim=1)


# ---------------------------------------------------------------------------
# ops without parameters


class OneHot(Op):
    name = "onehot"
    takes_category = True
    surgery = Surgery(Indices.ELEMENTWISE, zero_to_zero=True, idempotent=False, layout=Layout(entities="any"))

    def infer(self, inputs, ints, kw):
        (x,) = inputs
        if not x.is_category:
            raise OpError(f"onehot needs a category feature, got {x.describe()}", 0)
        return Value(x.width, x.entities), {}

    init = _no_params

    def forward(self, node, params, xs, ctx):
        torch = _torch()
        return torch.nn.functional.one_hot(xs[0], node.value.width).to(torch.get_default_dtype())

    def probe(self, node, params, xs, ctx):
        return xs[0]

    def shadow(self, node, xs):
        return xs[0], {}


class Concat(Op):
    name = "concat"
    n_tensors = None
    surgery = Surgery(Indices.CONCAT, zero_to_zero=True, idempotent=False, layout=Layout(entities="any"))

    def infer(self, inputs, ints, kw):
        for i, x in enumerate(inputs):
            _tensor_input("concat", x, i)
        sets = {x.entities for x in inputs}
        if len(sets) > 1:
            culprit = next(i for i, x in enumerate(inputs) if x.entities != inputs[0].entities)
            a, b = inputs[0], inputs[culprit]
            raise OpError(
                f"concat cannot join {a.describe()} with {b.describe()}: pool the entity set first"
                if None in sets
                else f"concat cannot join entity sets {a.entities} and {b.entities}",
                culprit,
            )
        return Value(sum(x.width for x in inputs), inputs[0].entities), {}

    init = _no_params

    def forward(self, node, params, xs, ctx):
        return _torch().cat(xs, dim=-1)

    probe = forward

    def shadow(self, node, xs):
        # chained, not summed: summing tuples is quadratic in the number of inputs
        return Axis(K.chained(tuple(x.keys for x in xs)), tuple(chain.from_iterable(x.sets for x in xs))), {}


class Elementwise(Op):
    """relu, tanh, sigmoid, gelu: each index keeps its own features."""

    torch_name: str

    def infer(self, inputs, ints, kw):
        (x,) = inputs
        _tensor_input(self.name, x)
        return x, {}

    init = _no_params

    def forward(self, node, params, xs, ctx):
        return getattr(_torch(), self.torch_name)(xs[0]) if self.torch_name != "gelu" else _torch().nn.functional.gelu(xs[0])

    def probe(self, node, params, xs, ctx):
        return self.forward(node, params, xs, ctx)

    def shadow(self, node, xs):
        return wrap_axis(self, xs[0]), {}


class Relu(Elementwise):
    name, torch_name = "relu", "relu"
    surgery = Surgery(Indices.ELEMENTWISE, zero_to_zero=True, idempotent=True, layout=Layout(entities="any"))


class Tanh(Elementwise):
    name, torch_name = "tanh", "tanh"
    surgery = Surgery(Indices.ELEMENTWISE, zero_to_zero=True, idempotent=False, layout=Layout(entities="any"))

    def probe(self, node, params, xs, ctx):
        return _torch().tanh(_unsaturated(xs[0], ctx))


class Gelu(Elementwise):
    name, torch_name = "gelu", "gelu"
    surgery = Surgery(Indices.ELEMENTWISE, zero_to_zero=True, idempotent=False, layout=Layout(entities="any"))


class Sigmoid(Elementwise):
    name, torch_name = "sigmoid", "sigmoid"
    surgery = Surgery(Indices.ELEMENTWISE, zero_to_zero=False, idempotent=False, layout=Layout(entities="any"))

    def probe(self, node, params, xs, ctx):
        return _torch().sigmoid(_unsaturated(xs[0], ctx)) - 0.5  # sigmoid(0) = 1/2 would invent a value from nothing


class Binary(Op):
    """add and mul: index i of the output reads index i of both (x ⊙ x: union)."""

    n_tensors = 2

    def infer(self, inputs, ints, kw):
        a, b = inputs
        _tensor_input(self.name, a, 0)
        _tensor_input(self.name, b, 1)
        if a.width != b.width:
            raise OpError(f"{self.name} needs inputs of one width, got {a.width} and {b.width}", 1)
        if a.entities != b.entities:
            raise OpError(f"{self.name} cannot combine {a.describe()} with {b.describe()}", 1)
        return a, {}

    init = _no_params

    def shadow(self, node, xs):
        a, b = xs
        return Axis(K.joined_axis(self.name, a.keys, b.keys), tuple(map(operator.or_, a.sets, b.sets))), {}


class Add(Binary):
    name = "add"
    surgery = Surgery(Indices.JOIN, zero_to_zero=True, idempotent=False, layout=Layout(entities="any"),
                      join_neutral=0.0)

    def forward(self, node, params, xs, ctx):
        return xs[0] + xs[1]

    probe = forward


class Mul(Binary):
    name = "mul"
    surgery = Surgery(Indices.JOIN, zero_to_zero=True, idempotent=False, layout=Layout(entities="any"),
                      join_neutral=1.0)

    def forward(self, node, params, xs, ctx):
        return xs[0] * xs[1]

    def probe(self, node, params, xs, ctx):
        # The boolean rule is the union (Table 1, x_i ⊙ x_j). A plain product is
        # zero when only one factor is on, so the gradient would miss features
        # of the other (the paper's footnote 5); (1 + a)(1 + b) - 1 is positive
        # when either factor is, which is exactly the union.
        a, b = xs
        return a + b + a * b


class Pool(Op):
    """maxpool, avgpool, sumpool: reduce the entity axis, padding masked out."""

    # Over entities; along the last axis, index by index. A set of zeros pools to zero.
    surgery = Surgery(Indices.ELEMENTWISE, zero_to_zero=True, idempotent=False,
                      layout=Layout(entities="required", pools=True))

    def infer(self, inputs, ints, kw):
        (x,) = inputs
        _tensor_input(self.name, x)
        if not x.entities:
            raise OpError(f"{self.name} needs an entity set, got {x.describe()}", 0)
        return Value(x.width), {}

    init = _no_params

    def shadow(self, node, xs):
        return wrap_axis(self, xs[0]), {}  # entities are not told apart: each index keeps its set

    def _mask(self, node, x, ctx):
        return ctx.masks[node.attrs["entities"]].unsqueeze(-1).to(x.dtype)

    def probe(self, node, params, xs, ctx):
        if ctx.probe_variant == "gradient":  # the paper's fix: max -> avg
            return AVGPOOL.forward(node, params, xs, ctx)
        return self.forward(node, params, xs, ctx)


class SumPool(Pool):
    name = "sumpool"

    def forward(self, node, params, xs, ctx):
        return (xs[0] * self._mask(node, xs[0], ctx)).sum(dim=-2)


class AvgPool(Pool):
    name = "avgpool"

    def forward(self, node, params, xs, ctx):
        mask = self._mask(node, xs[0], ctx)
        return (xs[0] * mask).sum(dim=-2) / mask.sum(dim=-2).clamp(min=1.0)


class MaxPool(Pool):
    name = "maxpool"

    def forward(self, node, params, xs, ctx):
        x, mask = xs[0], self._mask(node, xs[0], ctx)
        pooled = x.masked_fill(mask == 0, float("-inf")).amax(dim=-2)
        # An observation with no entities at all pools to zero, not -inf.
        return pooled.masked_fill(mask.sum(dim=-2) == 0, 0.0)


class Dropout(Op):
    """Zeroes elements while training; the identity in eval mode (inference,
    verification, both maps). So its indices keep their keys and feature sets:
    adding or removing a dropout, or changing p, moves no weight and keeps the function."""

    name = "dropout"
    n_ints = 1
    int_names = ("p",)
    decimals = True
    surgery = Surgery(Indices.ELEMENTWISE, zero_to_zero=True, idempotent=True, layout=Layout(entities="any"))

    def infer(self, inputs, ints, kw):
        (x,), (p,) = inputs, ints
        _tensor_input("dropout", x)
        if not 0 <= p < 1:
            raise OpError(f"dropout p is a probability below 1, got {p:g}", 1)
        return x, {}

    init = _no_params

    def forward(self, node, params, xs, ctx):
        return _torch().nn.functional.dropout(xs[0], node.attrs["ints"][0], training=ctx.training)

    def probe(self, node, params, xs, ctx):
        return xs[0]

    def shadow(self, node, xs):
        return xs[0], {}


# ---------------------------------------------------------------------------
# attention over entity sets


def _entity_mask(node: Node, x, ctx: RunContext):
    """[..., E]: 1 for a real entity of the op's set, 0 for padding."""
    return ctx.masks[node.attrs["entities"]].to(x.dtype)


def _linear_init(node: Node, name: str, tensor, generator) -> None:
    """nn.Linear's default, U(±1/sqrt(in)), for `<p>_weight` and `<p>_bias` alike."""
    fan_in = node.params[name.rsplit("_", 1)[0] + "_weight"].shape[1]
    bound = 1.0 / math.sqrt(fan_in)
    tensor.uniform_(-bound, bound, generator=generator)


class Attention(Op):
    """Masked multi-head self-attention: each entity attends to the real
    entities of its own set; head h owns rows h*D .. h*D+D-1 of q, k and v."""

    name = "attention"
    n_ints = 2
    int_names = ("heads", "head_dim")
    surgery = Surgery(Indices.MIXING, zero_to_zero=False, idempotent=False, layout=Layout(entities="required"),
                      starts_at_zero=True, fixed_args={"head_dim": "scores are scaled by 1/sqrt(head_dim)"})
    projections = ("q", "k", "v")

    def infer(self, inputs, ints, kw):
        (x,), (heads, head_dim) = inputs, ints
        _tensor_input("attention", x)
        if not x.entities:
            raise OpError(f"attention needs an entity set, got {x.describe()}", 0)
        _positive_width("attention", "heads", heads, 1)
        _positive_width("attention", "head_dim", head_dim, 2)
        width = heads * head_dim
        params = {}
        for p in self.projections:
            params[f"{p}_weight"] = ParamSpec((width, x.width), (OUT, IN))
            params[f"{p}_bias"] = ParamSpec((width,), (OUT,))
        params["out_weight"] = ParamSpec((width, width), (OUT, IN))
        params["out_bias"] = ParamSpec((width,), (OUT,))
        return Value(width, x.entities), params

    init = staticmethod(_linear_init)

    @staticmethod
    def _split(t, heads: int):
        """[..., E, H*D] -> [..., H, E, D]"""
        return t.unflatten(-1, (heads, -1)).transpose(-2, -3)

    @staticmethod
    def _join(t):
        """[..., H, E, D] -> [..., E, H*D]"""
        return t.transpose(-2, -3).flatten(-2)

    def forward(self, node, params, xs, ctx):
        torch = _torch()
        linear = torch.nn.functional.linear
        x = xs[0]
        heads, head_dim = node.attrs["ints"]
        mask = _entity_mask(node, x, ctx)
        q, k, v = (self._split(linear(x, params[f"{p}_weight"], params[f"{p}_bias"]), heads) for p in self.projections)
        scores = q @ k.transpose(-1, -2) / math.sqrt(head_dim)  # [..., H, E, E]
        # Padding keys score the lowest finite value, not -inf: a set with no real
        # entity would give nan (and nan gradients). With one real entity the
        # padding's weight underflows to exactly 0.
        scores = scores.masked_fill(mask[..., None, None, :] == 0, torch.finfo(scores.dtype).min)
        mixed = self._join(torch.softmax(scores, dim=-1) @ v)
        out = linear(mixed, params["out_weight"], params["out_bias"])
        return out * mask.unsqueeze(-1)  # padding entities, and a set with none real, give zeros

    def probe(self, node, params, xs, ctx):
        # The probe turns a feature on in every entity alike, and a softmax over
        # equal scores is flat: q and k would get no gradient. Here each value
        # v_j is weighted by 1 + softsign(q·k_j), averaged over real entities:
        # zero stays zero, every path of the forward is kept, and the output
        # grows like its input (a product q·k·v would saturate later tanhs).
        x = xs[0]
        heads, head_dim = node.attrs["ints"]
        mask = _entity_mask(node, x, ctx)
        q, k, v = (self._split(_gated_bias(x @ params[f"{p}_weight"].T, params[f"{p}_bias"]), heads)
                   for p in self.projections)
        scores = q @ k.transpose(-1, -2) / math.sqrt(head_dim)
        weights = (1 + scores / (1 + scores.abs())) * mask[..., None, None, :]
        weights = weights / mask.sum(dim=-1).clamp(min=1.0)[..., None, None, None]
        out = _gated_bias(self._join(weights @ v) @ params["out_weight"].T, params["out_bias"])
        return out * mask.unsqueeze(-1)

    def shadow(self, node, xs):
        (x,) = xs
        heads, head_dim = node.attrs["ints"]
        width = heads * head_dim
        seen = x.union()  # every output mixes every input index of every entity (q·k, softmax, v)
        # Rows of q, k and v, and the heads' outputs that out_weight reads, are
        # keyed by head and dimension: a new head is new keys, and a head keeps
        # its first rows when head_dim changes.
        per_head = K.chained(tuple(K.units(node.scope, head_dim, f"head {h}") for h in range(heads)))
        rows, bias_rows = Axis(per_head, (0,) * width), Axis(per_head, (seen,) * width)
        params = {}
        for p in self.projections:
            params[f"{p}_weight"] = (rows, x)
            params[f"{p}_bias"] = (bias_rows,)
        out_keys = K.units(node.scope, width)
        params["out_weight"] = (Axis(out_keys, (0,) * width), bias_rows)
        params["out_bias"] = (Axis(out_keys, (seen,) * width),)
        return Axis(out_keys, (seen,) * width), params


class Pointer(Op):
    """One score per entity slot of `x` for a vector `query`; padding scores -inf."""

    name = "pointer"
    n_tensors = 2
    n_ints = 1
    int_names = ("dim",)
    head_only = True
    # The output's last axis is the set's entity slots (the entity axis becomes the last).
    surgery = Surgery(Indices.MIXING, zero_to_zero=False, idempotent=False,
                      layout=Layout(entities="required", pools=True),
                      fixed_args={"dim": "scores are scaled by 1/sqrt(dim)"})

    def infer(self, inputs, ints, kw):
        (query, x), (dim,) = inputs, ints
        _tensor_input("pointer", query, 0, allow_entities=False)
        _tensor_input("pointer", x, 1)
        if not x.entities:
            raise OpError(f"pointer scores the entities of a set, got {x.describe()}", 1)
        _positive_width("pointer", "dim", dim, 2)
        return Value(x.cap), {
            "q_weight": ParamSpec((dim, query.width), (OUT, IN)),
            "q_bias": ParamSpec((dim,), (OUT,)),
            "k_weight": ParamSpec((dim, x.width), (OUT, IN)),
            "k_bias": ParamSpec((dim,), (OUT,)),
        }

    init = staticmethod(_linear_init)

    def forward(self, node, params, xs, ctx):
        torch = _torch()
        linear = torch.nn.functional.linear
        query, x = xs
        (dim,) = node.attrs["ints"]
        q = linear(query, params["q_weight"], params["q_bias"])  # [..., dim]
        k = linear(x, params["k_weight"], params["k_bias"])  # [..., E, dim]
        scores = (k @ q.unsqueeze(-1)).squeeze(-1) / math.sqrt(dim)
        return scores.masked_fill(_entity_mask(node, x, ctx) == 0, float("-inf"))

    def probe(self, node, params, xs, ctx):
        # A dot product is zero when either side is off (as a product is: the
        # paper's footnote 5); sum over d of (1 + q)(1 + k) - 1 sees the union.
        # Padding scores 0 here: zero stays zero.
        query, x = xs
        q = _gated_bias(query @ params["q_weight"].T, params["q_bias"]).unsqueeze(-2)
        k = _gated_bias(x @ params["k_weight"].T, params["k_bias"])
        return (q + k + q * k).sum(dim=-1) * _entity_mask(node, x, ctx)

    def shadow(self, node, xs):
        query, x = xs
        dim = node.params["q_bias"].shape[0]
        seen_q, seen_x = query.union(), x.union()
        q_rows, k_rows = K.units(node.scope, dim, "query"), K.units(node.scope, dim, "key")
        params = {
            "q_weight": (Axis(q_rows, (0,) * dim), query),
            "q_bias": (Axis(q_rows, (seen_q,) * dim),),
            "k_weight": (Axis(k_rows, (0,) * dim), x),
            "k_bias": (Axis(k_rows, (seen_x,) * dim),),
        }
        slots = node.value.width  # one score per entity slot; slots are not told apart
        return Axis(K.units(node.scope, slots, "entity"), (seen_q | seen_x,) * slots), params


AVGPOOL = AvgPool()

OPS: dict[str, Op] = {
    op.name: op
    for op in (
        GroupInput(), FeatureInput(), CategoryInput(),
        Linear(), Embed(), OneHot(), Concat(), LayerNorm(), LSTM(),
        Relu(), Tanh(), Sigmoid(), Gelu(), Add(), Mul(),
        MaxPool(), AVGPOOL, SumPool(),
        Attention(), Pointer(), GRU(), Dropout(),
    )
}

INPUT_OPS = tuple(name for name, op in OPS.items() if op.surgery.indices is Indices.SOURCE)
LANGUAGE_OPS = tuple(name for name in OPS if name not in INPUT_OPS)
READ_GROUP, READ_FEATURE, READ_CATEGORY = GroupInput.name, FeatureInput.name, CategoryInput.name
