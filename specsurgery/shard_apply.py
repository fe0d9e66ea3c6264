"""Carrying a plan out into a sharded checkpoint, one output shard per task, in
parallel.

The output is laid out first (which tensor in which shard, from the plan's
shapes), then each task writes whole shards with surgery/apply.py's
functions, each fresh tensor seeded by its own name, so the result equals a
one-file apply tensor for tensor whatever the order. Shards that need no
torch (bytes copied by the kernel, rows laid out in numpy: apply.needs_torch)
are written by threads of this process; the others by worker processes, which
import torch. Memory holds a few row blocks per task. Workers are started with 'spawn' (never fork
a process that may hold torch threads). The shards go into a staging folder
beside the target that replaces it only once every shard and the index are on
disk (shards.staged_folder).
"""
from __future__ import annotations

import os
from typing import Callable, Iterator, Optional, Union

from .checkpoint import Layout, StoredTensor, check_shapes, fill_checkpoint, read_header
from .errors import UserError
from .files import raise_write_error, tracked_writes
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
    import multiprocessing  # only here: its import is a sixtieth of a second

    pool = multiprocessing.get_context("spawn").Pool(jobs, initializer=start, initargs=start_args)
    try:
        yield from pool.imap_unordered(task, tasks)
    finally:
        pool.terminate()
        pool.join()


# ---------------------------------------------------------------------------
# the worker side: module globals set once per process by _start_worker


_WORKER: dict = {}


def _start_worker(plan_json: Optional[str], checkpoint: str, seed: int, durable: bool, graph=None, plan=None,
                  header=None) -> None:
    """Set this process up to write shards: the plan, the old checkpoint's header
    and the new graph (in a worker process read from the plan's JSON and spec;
    in the process that has them, given)."""
    from .surgery.apply import carried_dtypes

    if plan is None:
        from .surgery.plan import Plan

        plan = Plan.model_validate_json(plan_json)
    if graph is None:
        from .ir import build_graph
        from .spec.load import load_text

        graph = build_graph(load_text(plan.new_spec, "<plan new spec>").model(plan.new_model))
    header = header or read_header(checkpoint)
    _WORKER.update(plan=plan, params={p.name: p for p in plan.params}, header=header, checkpoint=checkpoint,
                   seed=seed, durable=durable, graph=graph, graph_params=graph.parameters(), opened=[],
                   dtypes=carried_dtypes(plan, header, {p.source: p.source for p in plan.params}))


def _read_old(name: str):
    """An old tensor as a torch tensor (a DCP job's chunks assembled): imports torch."""
    if not _WORKER["opened"]:
        from .checkpoint import open_tensors

        _WORKER["opened"].append(open_tensors(_WORKER["checkpoint"]))
    return _WORKER["opened"][0].get_tensor(name)


def _init(name: str):
    from .surgery.apply import op_init

    return op_init(_WORKER["graph"], name, _WORKER["graph_params"])


def _tensors_of(names: list[str]):
    from .surgery.apply import carried_tensor, streams

    header, seed = _WORKER["header"], _WORKER["seed"]
    for name in names:
        p = _WORKER["params"][name]
        if p.action == "copied" and streams(p, header, p.source):
            yield name, StoredTensor.of(header, p.source)
        else:
            yield name, carried_tensor(p, _init(name), header, p.source, _read_old, seed, _dtype(p))


def _dtype(p) -> str:
    return _WORKER["dtypes"][p.name]


def _write_shard(task: tuple[str, list[str], list[str]]) -> tuple[str, int, int]:
    """Fill one output shard, laid out already (shard_layouts), with the tensors
    `names` (the others were copied early); returns (file, tensors, bytes)."""
    path, shard, names = task
    plan = _WORKER["plan"]
    layout = Layout(plan.new_spec, plan.new_model, {name: tuple(_WORKER["params"][name].shape) for name in shard},
                    {name: _WORKER["dtypes"][name] for name in shard})
    fd = os.open(path, os.O_RDWR)
    try:
        with tracked_writes([fd], _WORKER["durable"]):
            written = fill_checkpoint(fd, layout, names, _tensors_of(names))
    finally:
        os.close(fd)
    return path, len(shard), written


def _needs_torch(name: str) -> bool:
    from .surgery.apply import needs_torch

    p = _WORKER["params"][name]
    return needs_torch(p, _init(name), _WORKER["header"], p.source, _WORKER["seed"], _dtype(p))


def _run(built: list, moved: list, jobs: int, init: tuple):
    """Write every shard, `jobs` at a time: shards written without torch (bytes
    copied by the kernel, rows laid out in numpy, which both let go of the GIL)
    in threads of this process, no process to start; the others in worker
    processes, as many as the threads leave free (in_workers: in this process
    when that is one; a worker with torch takes ~220 MB before its first tensor)."""
    from concurrent.futures import ThreadPoolExecutor

    if jobs == 1:
        yield from map(_write_shard, moved + built)
        return
    workers = min(len(built), jobs - 1 if moved else jobs)
    with ThreadPoolExecutor(max(1, jobs - workers)) as threads:
        done = threads.map(_write_shard, moved)  # submitted now: they run while the built shards are made
        if workers:
            yield from in_workers(_write_shard, built, workers, _start_worker, init)
        yield from done


# ---------------------------------------------------------------------------


def shard_layouts(spec_text: str, model_name: str, shapes: dict[str, tuple[int, ...]], dtypes: dict[str, str],
                  max_shard_size: Union[int, str, None], header) -> list[tuple[str, Layout]]:
    """Each output shard's file name and layout. `max_shard_size` defaults to
    the old checkpoint's largest shard (5GB for a one-file input)."""
    if max_shard_size is None:
        max_shard_size = header.largest_shard() if hasattr(header, "largest_shard") else DEFAULT_SHARD
    shards = plan_shards({n: tensor_bytes(s, dtypes[n]) for n, s in shapes.items()}, parse_size(max_shard_size))
    return [(shard_file(k, len(shards)), Layout(spec_text, model_name, {n: shapes[n] for n in names},
                                                 {n: dtypes[n] for n in names}))
            for k, names in enumerate(shards, 1)]


def apply_sharded(plan, checkpoint: str, new_spec, out: str, max_shard_size: Union[int, str, None] = None,
                  jobs: Optional[int] = None, seed: int = 0, durable: bool = True,
                  progress: Optional[Callable[[str, int], None]] = None, checked: bool = False,
                  finish: Optional[Callable[[str], None]] = None, early=None) -> dict:
    """Write the surgered checkpoint to the folder `out`, in the Hugging Face
    sharded layout. `max_shard_size` defaults to the old checkpoint's largest
    shard (or 5GB for a one-file input); `jobs` to one per core. `checked`:
    the caller made the plan from both specs just now (else it is made again to compare).
    `durable` False: no fsync anywhere (the folder still staged and renamed).
    `finish(staging folder)`, when given, writes what describes the shards in
    place of the index (dcp.apply_dcp: a DCP folder's spec file). `early`: the
    shards laid out before the plan was known, old tensors being copied into
    them (early_copy.early_output); used if their layout is the plan's."""
    from .ir import Graph, build_graph

    header = read_header(checkpoint)
    check_plan_fits(plan, header, new_spec, checked)
    new_graph = new_spec if isinstance(new_spec, Graph) else build_graph(new_spec)
    if os.path.abspath(out) == os.path.abspath(header.path):
        raise UserError(f"{out}: error: the output would replace the checkpoint being read; write elsewhere")
    shapes = {p.name: tuple(p.shape) for p in plan.params}
    # This process writes the shards that need no torch (from the plan at hand);
    # worker processes, if any, read the plan from its JSON.
    _start_worker(None, checkpoint, seed, durable, graph=new_graph, plan=plan, header=header)
    dtypes = _WORKER["dtypes"]
    layouts = shard_layouts(plan.new_spec, plan.new_model, shapes, dtypes, max_shard_size, header)
    copied = None
    if early is not None:
        from .early_copy import kept_as_is

        copied = early.adopt([layout for _, layout in layouts], kept_as_is(plan, header))
    jobs = max(1, min(jobs or default_jobs(), len(layouts)))
    fill = (plan, layouts, jobs, progress, checkpoint, seed, durable, out)
    if copied is None:
        with staged_folder(out, durable) as tmp:
            _start_files(tmp, layouts, out)
            written, built = _fill_shards(tmp, set(), *fill)
            _describe(tmp, plan, layouts, shapes, dtypes, durable, finish)
    else:
        written, built = _fill_shards(early.folder, copied, *fill)
        early.copies.help()  # the plan's own tensors are written: copy beside the early thread
        _describe(early.folder, plan, layouts, shapes, dtypes, durable, finish)
    return {"checkpoint": out, "bytes": written, "tensors": len(shapes), "shards": len(layouts), "jobs": jobs,
            "built_shards": built}


def _fill_shards(folder: str, copied: set[str], plan, layouts: list[tuple[str, Layout]], jobs: int, progress,
                 checkpoint: str, seed: int, durable: bool, out: str) -> tuple[int, int]:
    """Write every tensor of every shard but those `copied` (early), `jobs` shards
    at a time; returns (bytes of all the tensors, shards written by workers with torch)."""
    tasks = [(os.path.join(folder, name), list(layout.table), [n for n in layout.table if n not in copied])
             for name, layout in layouts]
    built = [t for t in tasks if any(_needs_torch(name) for name in t[2])]
    moved = [t for t in tasks if t not in built]
    init = (plan.model_dump_json() if built and jobs > 1 else None, checkpoint, seed, durable)
    written = sum(layout.nbytes(name) for _, layout in layouts for name in copied & layout.table.keys())
    try:
        for path, count, nbytes in _run(built, moved, jobs, init):
            written += nbytes
            if progress is not None:
                progress(os.path.basename(path), count)
    except OSError as e:
        raise_write_error(e, out)
        raise
    return written, len(built)


def _describe(folder: str, plan, layouts: list[tuple[str, Layout]], shapes: dict, dtypes: dict, durable: bool,
              finish: Optional[Callable[[str], None]]) -> None:
    """The index of the shards (or what `finish` writes in its place)."""
    if finish is None:
        write_index(folder, plan.new_spec, plan.new_model, [list(layout.table) for _, layout in layouts], shapes,
                    dtypes=dtypes, durable=durable)
    else:
        finish(folder)


def _start_files(folder: str, layouts: list[tuple[str, Layout]], out: str) -> None:
    """Each shard's file, its header written and extended to its size."""
    for name, layout in layouts:
        path = os.path.join(folder, name)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
            try:
                layout.start(fd)
            finally:
                os.close(fd)
        except OSError as e:
            raise_write_error(e, out)
            raise
