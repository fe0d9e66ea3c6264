"""One plan carried out on many checkpoints of one spec (every past opponent of
a self-play league, every checkpoint of a run), in worker processes.

The plan is made once, by the caller; each worker builds the new graph once and
then applies the plan to whole checkpoints, one task each, each into what it
was: a file through surgery/apply.apply_plan, with the optimizer file beside
it carried too (optimizer_state.carry_optimizer_file); a sharded folder into
a sharded folder (shard_apply), a DCP folder into a DCP folder with its
optimizer state (dcp.apply_dcp). The pool is shard_apply's. Each output
is written atomically by apply's writer; a checkpoint that fails (corrupt, of
another spec, a full disk) is reported by name and the others are written whole.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Optional

from .errors import UserError
from .shard_apply import default_jobs, in_workers


@dataclass(frozen=True)
class Outcome:
    checkpoint: str
    output: str
    optimizer: Optional[str] = None  # the carried optimizer file, when one was beside the checkpoint
    error: Optional[str] = None  # the message, when this checkpoint failed


def output_paths(checkpoints: list[str], out_dir: str) -> list[str]:
    """OUT_DIR/<name of each checkpoint>; refuses two of one name, or writing over an input."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UserError(f"{out_dir}: error: with several checkpoints, -o names a folder; this is a file")
    outs, seen = [], {}
    for path in checkpoints:
        name = os.path.basename(os.path.normpath(path))
        if name in seen:
            raise UserError(f"{path}: error: {seen[name]} has the same name; both would be written to "
                            f"{os.path.join(out_dir, name)}")
        seen[name] = path
        out = os.path.join(out_dir, name)
        if os.path.exists(out) and os.path.samefile(out, path):
            raise UserError(f"{out}: error: the output would replace the checkpoint being read; write elsewhere")
        outs.append(out)
    return outs


_WORKER: dict = {}


def _start_worker(plan_json: str, seed: int, durable: bool, threads: Optional[int]) -> None:
    import sys

    from .spec.load import load_text
    from .surgery.plan import Plan

    if threads is not None:  # the workers share the cores: one torch thread each, not one per core each
        if "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(threads)
        else:  # read by torch when (if ever) a tensor needs it: a plan that only moves bytes never imports it
            os.environ["OMP_NUM_THREADS"] = str(threads)

    plan = Plan.model_validate_json(plan_json)
    from .ir import build_graph

    graph = build_graph(load_text(plan.new_spec, "<plan new spec>").model(plan.new_model))  # once, for every task
    _WORKER.update(plan=plan, graph=graph, seed=seed, durable=durable)


def _apply_one(task: tuple[str, str]) -> Outcome:
    from .checkpoint import optimizer_path
    from .shards import is_folder_checkpoint
    from .surgery.apply import apply_plan

    checkpoint, out = task
    plan, graph, seed, durable = _WORKER["plan"], _WORKER["graph"], _WORKER["seed"], _WORKER["durable"]
    # The caller checked the plan against the first checkpoint's spec; every
    # writer refuses a checkpoint whose spec is another (checked=True: not planned again).
    try:
        optimizer = None
        if is_folder_checkpoint(checkpoint):  # into a folder of its kind, one worker per folder
            from .dcp import apply_dcp, is_dcp
            from .shard_apply import apply_sharded

            if is_dcp(checkpoint):
                optimizer = apply_dcp(plan, checkpoint, graph, out, jobs=1, seed=seed, checked=True,
                                      durable=durable)["optimizer"]
            else:
                apply_sharded(plan, checkpoint, graph, out, jobs=1, seed=seed, checked=True, durable=durable)
        else:
            apply_plan(plan, checkpoint, graph, out, seed=seed, durable=durable, checked=True)
            if os.path.exists(optimizer_path(checkpoint)):  # optimizer_state imports torch: only for a file to carry
                from .optimizer_state import carry_optimizer_file

                optimizer = carry_optimizer_file(plan, checkpoint, out, durable=durable)
    except UserError as e:
        return Outcome(checkpoint, out, error=str(e))
    except OSError as e:  # a full disk, a folder that cannot be written
        return Outcome(checkpoint, out, error=f"{out}: error: cannot write: {e.strerror or e}")
    return Outcome(checkpoint, out, optimizer)


def apply_many(plan, checkpoints: list[str], out_dir: str, jobs: Optional[int] = None, seed: int = 0,
               durable: bool = True, progress: Optional[Callable[[Outcome], None]] = None) -> list[Outcome]:
    """Apply `plan` to every checkpoint, writing OUT_DIR/<its name>; outcomes in
    the order of `checkpoints`. `jobs` defaults to one worker per core."""
    outs = output_paths(checkpoints, out_dir)
    os.makedirs(out_dir, exist_ok=True)
    tasks = list(zip(checkpoints, outs))
    jobs = max(1, min(jobs or default_jobs(), len(tasks)))
    done = {}
    start = (plan.model_dump_json(), seed, durable, 1 if jobs > 1 else None)
    for outcome in in_workers(_apply_one, tasks, jobs, _start_worker, start):
        done[outcome.checkpoint] = outcome
        if progress is not None:
            progress(outcome)
    return [done[c] for c in checkpoints]
