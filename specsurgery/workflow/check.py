"""`specsurgery check`: the pre-commit hook.

For each staged .spec (and each spec that `use`s a changed one) it compares
the staged text with HEAD and reports, per model, the surgery the change
implies; it fails when a spec does not load, or a change breaks the policy.
Everything here stays clear of torch: the hook runs on every commit.
"""
from __future__ import annotations

import os
import re
from typing import Optional

from ..errors import SpecError, UserError
from ..spec.load import ParseCache, load
from ..surgery.diff import make_plan
from .git import NotAtRevision, _git, git_dir, reader_at, repo_root
from .policy import Policy, load_policy
from .policy import policy_verdict

# `[ \t]*`, not `\s*`: a run of blank lines is not rescanned from each of its lines
_USE = re.compile(r'^[ \t]*use\s+"([^"\n]*)"', re.MULTILINE)


def _paths(result) -> list[str]:
    # -z: paths exactly as they are (git quotes non-ASCII names otherwise)
    return [p for p in result.stdout.decode("utf-8", "surrogateescape").split("\0") if p]


def staged_specs(root: str) -> list[str]:
    return _paths(_git(["diff", "--cached", "-z", "--name-only", "--diff-filter=ACMR", "--", "*.spec"], root))


def deleted_specs(root: str) -> list[str]:
    """Specs removed from the index in this commit (`git rm`)."""
    return _paths(_git(["diff", "--cached", "-z", "--name-only", "--diff-filter=D", "--", "*.spec"], root))


def tracked_specs(root: str) -> list[str]:
    return _paths(_git(["ls-files", "-z", "--cached", "--", "*.spec"], root))


def head_renames(root: str) -> dict[str, str]:
    """Staged path -> its path at HEAD, for specs git sees as moved."""
    out = _git(["diff", "--cached", "-z", "-M", "--name-status", "--diff-filter=R", "--", "*.spec"], root)
    fields = _paths(out)
    renames = {}
    while len(fields) >= 3:
        _status, old, new = fields[:3]
        renames[new] = old
        fields = fields[3:]
    return renames


def with_dependents(root: str, changed: list[str]) -> list[str]:
    """`changed` plus every tracked spec that uses one of them, directly or not."""
    read = reader_at("", root)
    uses: dict[str, set[str]] = {}
    for path in tracked_specs(root):
        try:
            text = read(path)
        except UserError:
            continue
        uses[path] = {os.path.normpath(os.path.join(os.path.dirname(path), u)) for u in _USE.findall(text)}
    out = list(dict.fromkeys(os.path.normpath(p) for p in changed))
    grew = True
    while grew:
        grew = False
        for path, used in uses.items():
            if path not in out and used & set(out):
                out.append(path)
                grew = True
    return out


def check(files: Optional[list[str]] = None, policy: Optional[Policy] = None, cwd: str = ".") -> dict:
    root = repo_root(cwd)
    policy = policy or load_policy(root)
    deleted = {os.path.normpath(p) for p in deleted_specs(root)}
    if files:
        tracked = {os.path.normpath(p) for p in tracked_specs(root)}
        rel = []
        for f in files:
            if not f.endswith(".spec"):
                continue  # a hook may pass every staged file: only specs are checked
            full = os.path.abspath(os.path.join(cwd, f))
            r = os.path.normpath(os.path.relpath(full, root))
            if not os.path.exists(full) and r not in tracked and r not in deleted:
                raise UserError(f"{f}: error: no such file")
            rel.append(r)
    else:
        rel = staged_specs(root) + sorted(deleted)
    targets = with_dependents(root, rel)
    lines: list[str] = []
    failed = False
    results = []
    staged, head = reader_at("", root), reader_at("HEAD", root)
    cache = ParseCache(os.path.join(git_dir(root), "specsurgery", "parsed"))
    moved = head_renames(root)
    for path in targets:
        try:
            new = load([path], staged, cache)
        except SpecError as e:
            lines.append(e.render())
            failed = True
            results.append({"file": path, "ok": False, "error": e.render()})
            continue
        except NotAtRevision:  # not in the index: deleted in this commit, or never there
            if os.path.normpath(path) in deleted:
                lines.extend(_deleted(path, head, cache, results))
            continue
        except UserError as e:  # in the index, but unreadable (not UTF-8)
            lines.append(str(e))
            failed = True
            results.append({"file": path, "ok": False, "error": str(e)})
            continue
        try:
            head_path = moved.get(path, path)  # a spec renamed in this commit keeps its history
            old = load([f"git:HEAD:{head_path}"], head, cache)  # spans name the revision they point into
        except (SpecError, UserError):
            old = None
        for name, spec in new.models.items():
            if os.path.normpath(new.model_files[name]) != os.path.normpath(path):
                continue
            where = f"{path}:{spec.model.span.line}:{spec.model.span.column}"
            if old is None or name not in old.models:
                lines.append(f"{where}: model {name}: new, nothing to carry over")
                results.append({"file": path, "model": name, "ok": True, "new": True})
                continue
            plan = make_plan(old.graphs[name], new.graphs[name])  # the graphs loading built
            s = plan.summary
            verdict = "function preserved" if s.function_preserving else "function NOT preserved"
            lines.append(f"{where}: model {name}: {100 * s.transfer_share:.2f}% transferred "
                         f"({s.transferred:,} of {s.old_params:,}), {s.zeroed:,} zeroed, {s.fresh:,} fresh, {verdict}")
            for r in s.reasons:
                lines.append(_revision_path(r.render()) if r.line else f"{where}: {r.message}")
            problems = policy_verdict(s, policy)
            for p in problems:
                lines.append(f"{where}: error: model {name}: {p}")
            failed |= bool(problems)
            results.append({"file": path, "model": name, "ok": not problems, "summary": s.model_dump(),
                            "problems": problems})
    if not targets:
        lines.append("no spec changes to check")
    return {"ok": not failed, "results": results, "text": "\n".join(lines), "exit": 1 if failed else 0}


def _deleted(path: str, head, cache, results: list) -> list[str]:
    """What `git rm` of a spec implies: the models it defined are no longer built."""
    try:
        old = load([f"git:HEAD:{path}"], head, cache)
    except (SpecError, UserError):
        results.append({"file": path, "ok": True, "deleted": True})
        return [f"{path}: deleted"]
    out = []
    for name, spec in old.models.items():
        if os.path.normpath(old.model_files[name]) != os.path.normpath(f"git:HEAD:{path}"):
            continue
        out.append(f"git:HEAD:{path}:{spec.model.span.line}:{spec.model.span.column}: model {name}: "
                   "removed with its spec: nothing is carried over, its checkpoint is no longer built")
        results.append({"file": path, "model": name, "ok": True, "deleted": True})
    return out or [f"{path}: deleted (it defined no model)"]


_REVISION_PATH = re.compile(r"^(git:[^:\n]*:)([^:\n]*)(:\d+:\d+: )")


def _revision_path(text: str) -> str:
    """`git:HEAD:specs/../common/x.spec:4:5: ...` -> `git:HEAD:common/x.spec:4:5: ...`"""
    return _REVISION_PATH.sub(lambda m: m.group(1) + os.path.normpath(m.group(2)) + m.group(3), text, count=1)
