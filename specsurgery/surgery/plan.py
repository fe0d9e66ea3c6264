"""The surgery plan as data: what moves where, what starts at zero or fresh, and
whether the new model computes what the old one did (and, where not, why).

A plan has a JSON form and a published JSON Schema (`specsurgery plan
--schema`), so it can be reviewed in a pull request, stored, and applied later.
Index maps are kept as runs: (new_start, old_start, length); indices of the
new axis outside every run have no old counterpart.
"""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

PLAN_FORMAT = "specsurgery-plan/1"


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


class ParamPlan(Frozen):
    name: str
    shape: tuple[int, ...]
    source: Optional[str] = Field(None, description="the old parameter it is carried from; null: all fresh")
    old_shape: Optional[tuple[int, ...]] = None
    axes: tuple[AxisMap, ...] = ()
    copied: int = Field(0, ge=0, description="elements copied from the old parameter")
    zeroed: int = Field(0, ge=0, description="elements that start at zero (an old unit reading a new input)")
    fresh: int = Field(0, ge=0, description="elements that start at the op's init (a new unit)")

    @property
    def action(self) -> str:
        if self.source is None:
            return "fresh"
        if self.zeroed == 0 and self.fresh == 0 and all(a.identity for a in self.axes) and self.name == self.source:
            return "copied"
        if any(a.matched < a.old_size for a in self.axes):
            return "narrowed" if self.copied else "restarted"
        if self.zeroed == 0 and self.fresh == 0:
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


class Summary(Frozen):
    old_params: int
    new_params: int
    transferred: int = Field(description="old parameter elements copied into the new model")
    zeroed: int
    fresh: int
    dropped: int = Field(description="old parameter elements with no place in the new model")
    function_preserving: bool
    reasons: tuple[Reason, ...] = ()

    @property
    def transfer_share(self) -> float:
        return self.transferred / self.old_params if self.old_params else 1.0


class Plan(Frozen):
    format: Literal["specsurgery-plan/1"] = PLAN_FORMAT
    old_model: str
    new_model: str
    old_spec: str = Field(description="canonical text of the old model and schema")
    new_spec: str = Field(description="canonical text of the new model and schema")
    params: tuple[ParamPlan, ...]
    dropped: tuple[DroppedParam, ...] = ()
    summary: Summary


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
        if action == "fresh":
            lines.append(f"  + {p.name} [{shape}] new: starts fresh")
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
            bits = []
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
