"""The project's policy: `[tool.specsurgery]` in pyproject.toml.

    [tool.specsurgery]
    specs = "specs"          # spec folder
    models = "models"        # checkpoint folder
    min_transfer = 0.9       # least share of old parameters a change carries over
    allow_lossy = false      # allow changes that do not preserve the function
    verify_states = 1000     # random states build and verify run (one rule for both)
    tolerance = 1e-5         # largest allowed output difference when preserved

These are the defaults (what holds without a pyproject.toml); command-line
flags override them. min_transfer only bites changes that are lossy anyway:
--allow-lossy lets a change drop up to a tenth of the old parameters, and a
change that drops more (a group renamed without `was`, say) needs min_transfer
lowered on purpose.
"""
from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, fields, replace
from typing import Optional

from ..errors import UserError

# The random states `build` verifies a surgery on and `verify` runs, unless
# verify_states says otherwise: one rule for both (ss.verify's default too).
DEFAULT_STATES = 1000


@dataclass(frozen=True)
class Policy:
    specs: str = "specs"
    models: str = "models"
    min_transfer: float = 0.9
    allow_lossy: bool = False
    verify_states: int = DEFAULT_STATES
    tolerance: float = 1e-5
    root: str = "."  # the folder of the pyproject.toml it came from

    def override(self, **flags) -> "Policy":
        return replace(self, **{k: v for k, v in flags.items() if v is not None})

    def path(self, relative: str) -> str:
        return relative if os.path.isabs(relative) else os.path.normpath(os.path.join(self.root, relative))


_TYPES = {"specs": str, "models": str, "min_transfer": (int, float), "allow_lossy": bool,
          "verify_states": int, "tolerance": (int, float)}


def find_pyproject(start: str = ".") -> Optional[str]:
    folder = os.path.abspath(start)
    while True:
        candidate = os.path.join(folder, "pyproject.toml")
        if os.path.isfile(candidate):
            return candidate
        if os.path.isdir(os.path.join(folder, ".git")) or os.path.dirname(folder) == folder:
            return None
        folder = os.path.dirname(folder)


def load_policy(start: str = ".") -> Policy:
    path = find_pyproject(start)
    if path is None:
        return Policy(root=os.path.abspath(start))
    from ..spec.load import read_disk

    try:
        data = tomllib.loads(read_disk(path))  # UTF-8 checked, a bad byte reported at its line
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path}: error: not valid TOML ({e})") from None
    tool = data.get("tool", {})
    section = tool.get("specsurgery", {}) if isinstance(tool, dict) else None
    root = os.path.dirname(path)
    if not isinstance(section, dict):
        raise UserError(f"{path}: error: [tool.specsurgery] must be a table")
    known = {f.name for f in fields(Policy)} - {"root"}
    values = {}
    for key, value in section.items():
        name = key.replace("-", "_")
        if name not in known:
            raise UserError(f"{path}: error: [tool.specsurgery] has unknown key {key!r} (keys: {', '.join(sorted(known))})")
        if not isinstance(value, _TYPES[name]) or (isinstance(value, bool) and _TYPES[name] is not bool):
            raise UserError(f"{path}: error: [tool.specsurgery] {key} has the wrong type ({type(value).__name__})")
        values[name] = value
    if not 0.0 <= float(values.get("min_transfer", 0.0)) <= 1.0:
        raise UserError(f"{path}: error: [tool.specsurgery] min_transfer must be between 0 and 1")
    return Policy(root=root, **values)


def policy_verdict(summary, policy: Policy) -> list[str]:
    """Why the policy refuses this change (empty: allowed)."""
    problems = []
    if not summary.function_preserving and not policy.allow_lossy:
        problems.append("the change does not preserve the function (allow it with --allow-lossy or allow_lossy = true)")
    if summary.transfer_share < policy.min_transfer:
        problems.append(f"only {100 * summary.transfer_share:.2f}% of the old parameters carry over; "
                        f"the policy asks for min_transfer = {policy.min_transfer:g} "
                        "(lower it in [tool.specsurgery] if that is meant)")
    return problems
