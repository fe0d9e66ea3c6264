"""Text for people: every table and report the commands print is laid out here."""
from __future__ import annotations

import json
import sys


def table(rows: list[list[str]], header: list[str], right: tuple[int, ...] = ()) -> str:
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    def line(r):
        return "  ".join(str(c).rjust(w) if i in right else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def emit_json(payload) -> None:
    json.dump(payload, sys.stdout, indent=2, sort_keys=False)
    sys.stdout.write("\n")


def verification_text(v) -> str:
    """`1000 random states (3 steps each), compared in float64, tolerance 1e-05` and one row per head."""
    steps = f"{v.steps} step{'s' if v.steps != 1 else ''} each"
    lines = [f"{v.states:,} {v.inputs} ({steps}), compared in {v.compared_in}, tolerance {v.tolerance:g}"]
    rows = [[h, f"{d:.3g}", "ok" if d <= v.tolerance else "DIFFERS"] for h, d in v.max_diff.items()]
    rows += [[h, "-", "only in the old model"] for h in v.only_old]
    rows += [[h, "-", "only in the new model"] for h in v.only_new]
    lines.append(table(rows, ["head", "max |old - new|", ""], right=(1,)))
    if not v.max_diff:
        lines.append("no head is in both models: nothing was compared")
    return "\n".join(lines)


def apply_text(out: str, s) -> str:
    """What `apply` says it did, from the plan's summary."""
    lines = [f"wrote {out}: {s.transferred:,} of {s.old_params:,} old parameters transferred "
             f"({100 * s.transfer_share:.2f}%), {s.zeroed:,} zero, {s.fresh:,} fresh; function "
             + ("preserved" if s.function_preserving else "NOT preserved")]
    lines += [f"  {r.render()}" for r in s.reasons]
    return "\n".join(lines)
