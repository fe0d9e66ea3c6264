"""One model's surgery inside `specsurgery build`: plan, policy, apply, verify, swap.

Order of writes, so that killing the process at any moment leaves the model's
checkpoint whole (old or new, never torn or missing):
  1. the old checkpoint is linked (or copied, atomically) into history/;
  2. the new one is streamed into a staging file beside the target and renamed
     into place by apply's atomic writer only after verification passed.
"""
from __future__ import annotations

import contextlib
import filecmp
import hashlib
import os
import shutil

from ..checkpoint import check_against, load_spec, optimizer_path, read_header
from ..files import atomic_file
from ..ir import build_graph
from ..spec import model as m
from ..surgery.diff import make_plan
from ..surgery.plan import render_plan
from .folder import staged_path
from .policy import Policy, policy_verdict


def spec_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def history_path(target: str, spec_text: str) -> str:
    folder = os.path.join(os.path.dirname(target), "history")
    stem = os.path.basename(target).removesuffix(".safetensors")
    return os.path.join(folder, f"{stem}-{spec_hash(spec_text)}.safetensors")


def _same_bytes(a: str, b: str) -> bool:
    if os.path.samefile(a, b):
        return True
    return os.path.getsize(a) == os.path.getsize(b) and filecmp.cmp(a, b, shallow=False)


def keep_in_history(target: str, spec_text: str) -> tuple[str, bool]:
    """Keep the target in history/, named by its spec's hash. The same spec can
    come back with other (trained) weights: then a numbered name, never the old file.
    Returns the path and whether it was made now (False: it was already there)."""
    if os.path.isdir(target):
        from ..shards import keep_folder_in_history

        return keep_folder_in_history(target, history_path(target, spec_text).removesuffix(".safetensors"))
    path = history_path(target, spec_text)
    n = 1
    while os.path.exists(path):
        if _same_bytes(path, target):
            return path, False
        n += 1
        path = history_path(target, spec_text).removesuffix(".safetensors") + f".{n}.safetensors"
    _link_or_copy(target, path)
    return path, True


def _link_or_copy(source: str, path: str) -> None:
    tmp = path + ".tmp"
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if os.path.exists(tmp):
            os.unlink(tmp)
        os.link(source, tmp)  # the source is only ever replaced by rename, so a link keeps the old bytes
        os.replace(tmp, path)
    except OSError:
        with atomic_file(path) as out, open(source, "rb") as src:
            shutil.copyfileobj(src, out, 16 * 1024 * 1024)


def surgery_step(target: str, spec: m.ModelSpec, policy: Policy, seed: int = 0, dry_run: bool = False,
                 progress: bool = True) -> dict:
    header = read_header(target)
    old_spec = load_spec(header)
    check_against(header, build_graph(old_spec))  # before anything is written (history, staging)
    plan = make_plan(old_spec, spec)
    s = plan.summary
    row = {"transferred": s.transferred, "old_params": s.old_params, "zeroed": s.zeroed, "fresh": s.fresh,
           "dropped": s.dropped, "function_preserving": s.function_preserving,
           "reasons": [r.model_dump() for r in s.reasons]}
    problems = policy_verdict(s, policy)
    if problems:
        lines = [f"{target}: refused surgery for model {spec.model.name}:"] + [f"  {p}" for p in problems]
        lines += [f"  {r.render()}" for r in s.reasons]
        return {**row, "action": "refused", "refused": True, "detail": "\n".join(lines)}
    if dry_run:
        return {**row, "action": "would operate", "detail": render_plan(plan)}

    made: list[str] = []  # what this surgery wrote: undone when it fails
    staged = staged_path(target)  # build swept leftovers
    history = os.path.dirname(history_path(target, header.spec_text))
    new_history = [] if os.path.isdir(history) else [history]  # made by this surgery: removed if left empty
    try:
        result = _operate(plan, header, spec, target, staged, policy, row, seed, progress, made)
    except BaseException:
        _undo(made + [staged, optimizer_path(staged)], new_history)
        raise
    if result.get("refused"):
        _undo(made + [staged, optimizer_path(staged)], new_history)
    else:
        _commit(staged, target)
    return result


def _undo(paths: list[str], empty_folders: list[str]) -> None:
    """The old checkpoint is still the target: history gains nothing from a failed surgery."""
    for path in paths:
        with contextlib.suppress(OSError):
            shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.unlink(path)
    for folder in empty_folders:
        with contextlib.suppress(OSError):
            os.rmdir(folder)


def _operate(plan, header, spec: m.ModelSpec, target: str, staged: str, policy: Policy, row: dict,
             seed: int, progress: bool, made: list[str]) -> dict:
    from ..progress import Progress
    from ..surgery.apply import apply_plan
    from ..api import verify

    s = plan.summary
    kept, kept_now = keep_in_history(target, header.spec_text)
    if kept_now:
        made.append(kept)
    optimizer = optimizer_path(target)
    if os.path.exists(optimizer):  # history keeps the optimizer beside its checkpoint
        if not os.path.exists(optimizer_path(kept)):
            made.append(optimizer_path(kept))
        _link_or_copy(optimizer, optimizer_path(kept))
    bar = Progress(f"surgery {spec.model.name}", len(plan.params), enabled=progress)
    try:
        if os.path.isdir(target):  # sharded: shard by shard, in worker processes
            from ..shard_apply import apply_sharded

            apply_sharded(plan, kept, spec, staged, seed=seed, checked=True)
        else:
            apply_plan(plan, kept, spec, staged, seed=seed, progress=bar)
        if os.path.exists(optimizer):
            from ..optimizer_state import carry_optimizer_file

            carry_optimizer_file(plan, kept, staged)
    finally:
        bar.close()
    detail = [f"  surgery: {s.transferred:,} of {s.old_params:,} old parameters transferred "
              f"({100 * s.transfer_share:.2f}%), {s.zeroed:,} zero, {s.fresh:,} fresh; previous kept as {kept}"]
    if s.function_preserving and policy.verify_states > 0:
        result = verify(kept, staged, states=policy.verify_states, tolerance=policy.tolerance, seed=seed)
        report = result.report()
        # the difference is a number (null: a NaN); the verdict says what it means
        row.update(max_difference=report["max"], tolerance=policy.tolerance, verified_states=result.states,
                   verdict="same function" if result.ok else "differs")
        if not result.ok:
            return {**row, "action": "refused", "refused": True,
                    "detail": f"{target}: surgery for model {spec.model.name} failed verification: "
                              f"largest difference {result.largest:.3g} > tolerance {policy.tolerance:g}; nothing changed"}
        detail.append(f"  verified on {result.states:,} random states (compared in float64): "
                      f"largest difference {result.largest:.3g}")
    else:
        row["verdict"] = "lossy (allowed)" if not s.function_preserving else "not verified (verify_states = 0)"
        for r in s.reasons:
            detail.append(f"  lossy (allowed): {r.render()}")
    if os.path.exists(optimizer_path(staged)):
        detail.append(f"  optimizer state carried to {optimizer}")
    return {**row, "action": "operated", "history": kept, "detail": "\n".join(detail)}


def _commit(staged: str, target: str) -> None:
    """The verified checkpoint into place, then its optimizer file. A build killed
    between the two renames finishes the second at its next start
    (folder.finish_commit); nothing is undone past the first."""
    if os.path.isdir(staged):
        from ..shards import commit_folder

        commit_folder(staged, target)
    else:
        os.replace(staged, target)
    if os.path.exists(optimizer_path(staged)):
        os.replace(optimizer_path(staged), optimizer_path(target))
