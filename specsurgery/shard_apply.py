"""Carrying a plan out into a sharded checkpoint, one output shard per task, in
worker processes.

The output is laid out first (which tensor in which shard, from the plan's
shapes), then each worker writes whole shards: tensors only moved are copied
file to file (no torch in a worker whose shards hold only those), the rest are
built by surgery/apply.py's functions, each seeded by its own name, so the
result equals a one-file apply tensor for tensor whatever the order. Memory
holds a few tensors per worker. Workers are started with 'spawn' (never fork
a process that may hold torch threads). The shards go into a staging folder
beside the target that replaces it only once every shard and the index are on
disk (shards.staged_folder).
"""
from __future__ import annotations

import multiprocessing
import os
from typing import Callable, Iterator, Optional, Union

from .checkpoint import StoredTensor, check_shapes, read_header, write_checkpoint
from .errors import UserError
from .shards import parse_size, plan_shards, shard_file, staged_folder, tensor_bytes, write_index

DEFAULT_SHARD = "5GB"  # Hugging Face's default max_shard_size, for a one-file input


def default_jobs() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def check_plan_fits(plan, header, new_spec, checked: bool = False) -> None:
    """Refuse a plan made for another old checkpoint or another new spec, and
    (unless `checked`: the caller made it from both specs just now) one that
    is not the plan the specs give. The checks apply_plan makes, without torch."""
    from .ir import build_graph
    from .spec.canonical import canonical

    if header.spec_text != plan.old_spec:
        raise UserError(f"{header.path}: error: the plan was made for another old spec than the one in this checkpoint")
    if canonical(new_spec) != plan.new_spec:
        raise UserError("error: the plan was made for another new spec than the one given")
    expected = {p.source: tuple(p.old_shape) for p in plan.params if p.source is not None}
    expected.update({d.name: tuple(d.shape) for d in plan.dropped})
    check_shapes(header, expected)
    from .checkpoint import load_spec
    from .surgery.diff import check_plan

    if not checked:  # planning again costs as much as planning: once is enough
        check_plan(plan, build_graph(load_spec(header)), build_graph(new_spec))  # the plan the specs give, or none


def in_workers(task: Callable, tasks: list, jobs: int, start: Callable, start_args: tuple) -> Iterator:
    """task(t) for every t of `tasks`, as each finishes, in `jobs` worker
    processes, each set up once by start(*start_args); in this process when
    jobs is 1. Leaving the loop early (an error) stops the workers."""
    if jobs == 1:
        start(*start_args)
        yield from map(task, tasks)
        return
    pool = multiprocessing.get_context("spawn").Pool(jobs, initializer=start, initargs=start_args)
    try:
        yield from pool.imap_unordered(task, tasks)
    finally:
        pool.terminate()
        pool.join()


# ---------------------------------------------------------------------------
# the worker side: module globals set once per process by _start_worker


_WORKER: dict = {}


def _start_worker(plan_json: str, checkpoint: str, seed: int, durable: bool) -> None:
    from .surgery.plan import Plan

    plan = Plan.model_validate_json(plan_json)
    _WORKER.update(plan=plan, params={p.name: p for p in plan.params}, header=read_header(checkpoint),
                   checkpoint=checkpoint, seed=seed, durable=durable, built=None)


def _built_parts():
    """The new graph's parameters and the old tensors, for tensors that are not
    only moved: the first call imports torch (apply.py), once per worker."""
    if _WORKER["built"] is None:
        from .checkpoint import open_tensors
        from .ir import build_graph
        from .spec.load import load_text

        plan = _WORKER["plan"]
        spec = load_text(plan.new_spec, "<plan new spec>").model(plan.new_model)
        _WORKER["built"] = (build_graph(spec), open_tensors(_WORKER["checkpoint"]))
    return _WORKER["built"]


def _tensors_of(names: list[str]):
    header, seed = _WORKER["header"], _WORKER["seed"]
    for name in names:
        p = _WORKER["params"][name]
        # a tensor a DCP job saved in several chunks has no bytes to copy as they are
        in_one_piece = p.source is not None and getattr(header, "whole", lambda _: True)(p.source)
        if p.action == "copied" and in_one_piece:
            yield name, StoredTensor.of(header, p.source)
            continue
        from .surgery.apply import build_tensor, carried_tensor, fresh_generator, fresh_init

        graph, old = _built_parts()
        if p.action == "copied":
            yield name, old.get_tensor(p.source)
        elif in_one_piece or p.source is None:
            yield name, carried_tensor(p, graph, header, p.source, old.get_tensor, seed)
        else:  # built in memory from the assembled chunks
            yield name, build_tensor(p, old.get_tensor, fresh_init(graph, name, fresh_generator(seed, name)))


def _write_shard(task: tuple[str, list[str]]) -> tuple[str, int, int]:
    """Write one output shard; returns (file, tensors, bytes)."""
    path, names = task
    plan = _WORKER["plan"]
    shapes = {name: tuple(_WORKER["params"][name].shape) for name in names}
    written = write_checkpoint(path, plan.new_spec, plan.new_model, shapes, _tensors_of(names),
                               durable=_WORKER["durable"])
    return path, len(names), written


def _needs_torch(name: str) -> bool:
    p = _WORKER["params"][name]
    return p.action != "copied" or not getattr(_WORKER["header"], "whole", lambda _: True)(p.source)


def _run(built: list, copies: list, jobs: int, init: tuple):
    """Write every shard, `jobs` at a time: shards that are only copies in threads
    of this process (the kernel copies; no torch, no process to start), the
    others in the jobs the copies leave free (in_workers: in this process when
    that is one; a worker with torch takes ~220 MB before its first tensor)."""
    from concurrent.futures import ThreadPoolExecutor

    if jobs == 1:
        yield from map(_write_shard, copies + built)
        return
    workers = min(len(built), jobs - 1 if copies else jobs)
    with ThreadPoolExecutor(max(1, jobs - workers)) as threads:
        copied = threads.map(_write_shard, copies)  # submitted now: they run while the built shards are made
        if workers:
            yield from in_workers(_write_shard, built, workers, _start_worker, init)
        yield from copied


# ---------------------------------------------------------------------------


def apply_sharded(plan, checkpoint: str, new_spec, out: str, max_shard_size: Union[int, str, None] = None,
                  jobs: Optional[int] = None, seed: int = 0, durable: bool = True,
                  progress: Optional[Callable[[str, int], None]] = None, checked: bool = False) -> dict:
    """Write the surgered checkpoint to the folder `out`, in the Hugging Face
    sharded layout. `max_shard_size` defaults to the old checkpoint's largest
    shard (or 5GB for a one-file input); `jobs` to one per core. `checked`:
    the caller made the plan from both specs just now (else it is made again to compare)."""
    header = read_header(checkpoint)
    check_plan_fits(plan, header, new_spec, checked)
    if os.path.abspath(out) == os.path.abspath(header.path):
        raise UserError(f"{out}: error: the output would replace the checkpoint being read; write elsewhere")
    if max_shard_size is None:
        max_shard_size = header.largest_shard() if hasattr(header, "largest_shard") else DEFAULT_SHARD
    shapes = {p.name: tuple(p.shape) for p in plan.params}
    shards = plan_shards({n: tensor_bytes(s) for n, s in shapes.items()}, parse_size(max_shard_size))
    jobs = max(1, min(jobs or default_jobs(), len(shards)))
    written = 0
    with staged_folder(out) as tmp:
        tasks = [(os.path.join(tmp, shard_file(k, len(shards))), names) for k, names in enumerate(shards, 1)]
        init = (plan.model_dump_json(), checkpoint, seed, durable)
        _start_worker(*init)  # this process writes the shards that are only copies
        built = [t for t in tasks if any(_needs_torch(name) for name in t[1])]
        copies = [t for t in tasks if t not in built]
        for path, count, nbytes in _run(built, copies, jobs, init):
            written += nbytes
            if progress is not None:
                progress(os.path.basename(path), count)
        write_index(tmp, plan.new_spec, plan.new_model, shards, shapes)
    return {"checkpoint": out, "bytes": written, "tensors": len(shapes), "shards": len(shards), "jobs": jobs,
            "built_shards": len(built)}
