"""The surgery plan as data: what moves where, what starts at zero or fresh, and
whether the new model computes what the old one did (and, where not, why).

A plan has a JSON form and a published JSON Schema (`specsurgery plan
--schema`), so it can be reviewed in a pull request, stored, and applied later.
Index maps are kept as runs: (new_start, old_start, length); indices of the
new axis outside every run have no old counterpart.

A plan is the whole truth about every element (DESIGN.md): per parameter, the
copied runs and a `Fill` for every element no run copies (zero, fresh, or the
identity), and per output head the map verification compares by. The
executor (apply.py) reads these; nothing derives them again.
"""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

PLAN_FORMAT = "specsurgery-plan/2"


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Run(Frozen):
    new: int = Field(ge=0)
    old: int = Field(ge=0)
    length: int = Field(ge=1)


class AxisMap(Frozen):
    role: Literal["out", "in"] = Field(description="out: units this op makes; in: indices it reads")
    new_size: int = Field(ge=0)
    old_size: int = Field(ge=0)
    runs: tuple[Run, ...] = ()

    def old_indices(self) -> list[int]:
        """new index -> old index, or -1 for an index new to this version."""
        out = [-1] * self.new_size
        for r in self.runs:
            out[r.new : r.new + r.length] = range(r.old, r.old + r.length)
        return out

    @property
    def matched(self) -> int:
        return sum(r.length for r in self.runs)

    @property
    def identity(self) -> bool:
        return self.new_size == self.old_size and self.runs == (Run(new=0, old=0, length=self.new_size),) if self.new_size else self.old_size == 0


Region = Literal["all", "new", "old"]


class Fill(Frozen):
    """How the elements of one region of a parameter start. The region takes,
    along each axis, every index ("all"), the indices no run matches ("new"),
    or the matched ones ("old")."""

    value: Literal["zero", "fresh", "identity"] = Field(
        description="zero; fresh: the op's init; identity: ones where the row equals the column, zero elsewhere")
    where: tuple[Region, ...]


class ParamPlan(Frozen):
    name: str
    shape: tuple[int, ...]
    source: Optional[str] = Field(None, description="the old parameter it is carried from; null: nothing copied")
    old_shape: Optional[tuple[int, ...]] = None
    axes: tuple[AxisMap, ...] = ()
    fills: tuple[Fill, ...] = Field((), description="how every element no run copies starts; the regions do not overlap")
    copied: int = Field(0, ge=0, description="elements copied from the old parameter")
    zeroed: int = Field(0, ge=0, description="elements that start at zero (an old unit reading a new input, a join at zero)")
    fresh: int = Field(0, ge=0, description="elements that start at the op's init (a new unit)")
    identity: int = Field(0, ge=0, description="elements of an identity start (an inserted layer)")

    def region(self, fill: Fill) -> list[list[int]]:
        """Per axis, the indices `fill` covers."""
        out = []
        for k, where in enumerate(fill.where):
            n = self.shape[k]
            if where == "all" or not self.axes:
                out.append(list(range(n)))
                continue
            matched = self.axes[k].old_indices()
            out.append([i for i in range(n) if (matched[i] >= 0) == (where == "old")])
        return out

    def region_size(self, fill: Fill) -> int:
        size = 1
        for k, where in enumerate(fill.where):
            n = self.shape[k]
            if where != "all" and self.axes:
                matched = self.axes[k].matched
                n = matched if where == "old" else n - matched
            size *= n
        return size

    @property
    def action(self) -> str:
        if self.source is None:
            if self.identity:
                return "identity"
            return "fresh" if self.fresh else "zero"
        unchanged = self.zeroed == 0 and self.fresh == 0 and self.identity == 0
        if unchanged and all(a.identity for a in self.axes) and self.name == self.source:
            return "copied"
        if any(a.matched < a.old_size for a in self.axes):
            return "narrowed" if self.copied else "restarted"
        if unchanged:
            return "moved"
        return "grown" if self.copied else "restarted"


class DroppedParam(Frozen):
    name: str
    shape: tuple[int, ...]
    elements: int


class Reason(Frozen):
    """Why the function is not preserved, pointing at the spec line to blame."""

    message: str
    file: str = ""
    line: int = 0
    column: int = 0

    def render(self) -> str:
        where = f"{self.file}:{self.line}:{self.column}: " if self.line else ""
        return f"{where}{self.message}"


class HeadMap(Frozen):
    """Which output of an old head each output of a new head is compared with."""

    name: str
    old_name: str
    new_size: int = Field(ge=0)
    old_size: int = Field(ge=0)
    runs: tuple[Run, ...] = ()


class Summary(Frozen):
    old_params: int
    new_params: int
    transferred: int = Field(description="old parameter elements copied into the new model")
    zeroed: int
    fresh: int
    identity: int = Field(0, description="elements of parameters that start as the identity (inserted layers)")
    dropped: int = Field(description="old parameter elements with no place in the new model")
    function_preserving: bool
    reasons: tuple[Reason, ...] = ()

    @property
    def transfer_share(self) -> float:
        return self.transferred / self.old_params if self.old_params else 1.0


class Plan(Frozen):
    format: Literal["specsurgery-plan/2"] = PLAN_FORMAT
    old_model: str
    new_model: str
    old_spec: str = Field(description="canonical text of the old model and schema")
    new_spec: str = Field(description="canonical text of the new model and schema")
    params: tuple[ParamPlan, ...]
    dropped: tuple[DroppedParam, ...] = ()
    heads: tuple[HeadMap, ...] = Field((), description="the heads both versions have, output by output")
    old_only_heads: tuple[str, ...] = Field((), description="heads of the old version the new one has not")
    new_only_heads: tuple[str, ...] = Field((), description="heads of the new version the old one had not")
    summary: Summary


def head_columns(plan: Plan) -> dict[str, tuple[str, list[int], list[int]]]:
    """For verification: new head -> (old head, new outputs, the old outputs they are compared with)."""
    out = {}
    for h in plan.heads:
        new_cols = [r.new + i for r in h.runs for i in range(r.length)]
        old_cols = [r.old + i for r in h.runs for i in range(r.length)]
        out[h.name] = (h.old_name, new_cols, old_cols)
    return out


def plan_json_schema() -> dict:
    schema = Plan.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "specsurgery surgery plan"
    return schema


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def render_plan(plan: Plan) -> str:
    """The plan as a reviewer reads it: per parameter, what happens to it."""
    s = plan.summary
    lines = [f"surgery {plan.old_model} -> {plan.new_model}: "
             f"{s.transferred:,} of {s.old_params:,} old parameters transferred ({100 * s.transfer_share:.2f}%), "
             f"{s.zeroed:,} start at zero, {s.fresh:,} start fresh, {s.dropped:,} dropped"]
    for p in plan.params:
        shape = "x".join(map(str, p.shape))
        action = p.action
        if action == "copied":
            lines.append(f"  = {p.name} [{shape}] copied")
            continue
        if action in ("fresh", "zero", "identity"):
            start = {"fresh": "starts fresh", "zero": "starts at zero", "identity": "starts as the identity"}[action]
            lines.append(f"  + {p.name} [{shape}] new: {start}")
            continue
        detail = []
        if p.source != p.name:
            detail.append(f"from {p.source}")
        for k, axis in enumerate(p.axes):
            if axis.identity:
                continue
            new = axis.new_size - axis.matched
            gone = axis.old_size - axis.matched
            moved = sum(r.length for r in axis.runs if r.new != r.old)
            # in place + moved + dropped = old size; in place + moved + new = new size
            in_place = axis.matched - moved
            bits = [f"{in_place} in place"] if in_place and (moved or new or gone) else []
            if moved:
                bits.append(f"{moved} moved")
            if new:
                bits.append(f"{new} new")
            if gone:
                bits.append(f"{gone} dropped")
            if bits:
                detail.append(f"axis {k} ({axis.role}, {axis.old_size}->{axis.new_size}): {', '.join(bits)}")
        counts = [f"{p.copied:,} copied"]
        if p.zeroed:
            counts.append(f"{p.zeroed:,} zero")
        if p.fresh:
            counts.append(f"{p.fresh:,} fresh")
        if p.identity:
            counts.append(f"{p.identity:,} identity")
        mark = "~" if action in ("moved", "grown") else "!"  # "!": old weights lost here
        lines.append(f"  {mark} {p.name} [{shape}] {action}: {'; '.join(detail)}; {', '.join(counts)}")
    for d in plan.dropped:
        lines.append(f"  - {d.name} [{'x'.join(map(str, d.shape))}] dropped ({d.elements:,} elements)")
    if s.function_preserving:
        lines.append("function preserved: the new model computes what the old one did")
    else:
        lines.append("function NOT preserved:")
        lines.extend(f"  {r.render()}" for r in s.reasons)
    return "\n".join(lines)
