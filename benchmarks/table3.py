"""The paper's Table 3 on this machine: specs/five.spec -> specs/five_next.spec.

    python benchmarks/table3.py [--quick]

Rows, as in the paper: interactions found (share of the boolean map's
(feature, element) pairs a method finds) and parameters transferred (share of
the original model's parameters a plan made from that row's map alone would
carry over, matching every axis index by its feature set among the features
both versions have, then its ordinal: the paper's section 2.4), and the time to
make the map.

What runs at which size is printed with the figures:
  * the boolean map is made and timed at full size (about 160M parameters);
  * a gradient map at full size would take hours here, so it is timed on a
    sample of features at full size and extrapolated to all features;
  * interactions found and transfer of the gradient rows come from complete
    maps of the same pair with every layer width divided by --scale (default
    16: the same schema and features, the same architecture, ~1/200 of the
    parameters); the boolean row is given at both sizes.
Then the product's own plan at full size: time to plan, time and peak memory
to apply to a full-size checkpoint, and the verified output difference.
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from specsurgery.backends.shadow import shadow_map  # noqa: E402
from specsurgery.ir import build_graph  # noqa: E402
from specsurgery.spec.load import load_text  # noqa: E402
from specsurgery.surgery.diff import find_renames, make_plan, shared_features, translate_bits  # noqa: E402

PAPER = {  # Table 3 of the paper: found, transferred, seconds
    "gradient-positive": ("0.52%", "90.13%", "-"),
    "gradient-random": ("49.42%", "94.91%", "-"),
    "gradient": ("100%", "98.68%", "907.92 ± 195.31"),
    "boolean": ("100%", "98.68%", "37.88 ± 0.76"),
}
LABELS = {
    "gradient-positive": "Gradient (positive init, max-pool kept)",
    "gradient-random": "Gradient (random init)",
    "gradient": "Gradient (positive init, max -> avg)",
    "boolean": "Boolean logic",
}


def read(name: str) -> str:
    with open(os.path.join(ROOT, "specs", name), encoding="utf-8") as f:
        return f.read()


def only_model(text: str, path: str):
    loaded = load_text(text, path)
    (spec,) = loaded.models.values()
    return spec


def scaled(text: str, factor: int) -> str:
    """The same spec with every linear / lstm / embed width divided by `factor`."""
    from specsurgery.spec import model as m
    from specsurgery.spec.canonical import canonical

    def shrink(expr):
        if not isinstance(expr, m.Call):
            return expr
        args = tuple(m.IntArg(value=max(2, a.value // factor)) if isinstance(a, m.IntArg) else shrink(a) for a in expr.args)
        return expr.model_copy(update={"args": args})

    loaded = load_text(text, "<scaled>")
    (spec,) = loaded.models.values()
    model = spec.model.model_copy(update={"statements": tuple(
        s.model_copy(update={"expr": shrink(s.expr)}) if not s.out else s.model_copy(update={"expr": _heads(s.expr, shrink)})
        for s in spec.model.statements)})
    return canonical(spec.model_copy(update={"model": model}))


def _heads(expr, shrink):
    """Heads keep their width (it is the action space); what they read shrinks."""
    from specsurgery.spec import model as m

    if isinstance(expr, m.Call):
        return expr.model_copy(update={"args": tuple(a if isinstance(a, m.IntArg) else shrink(a) for a in expr.args)})
    return expr


# ---------------------------------------------------------------------------
# a plan from a map alone


def axis_sets_from_boolean(phi) -> dict[str, list[list[int]]]:
    return {name: [list(axis.sets) for axis in p.axes] for name, p in phi.params.items()}


def map_only_transfer(old_phi, new_phi, old_sets, new_sets, renames) -> float:
    """Share of old parameters carried over when indices are matched by their
    feature sets (restricted to shared features) and ordinal, as in the paper."""
    mask, runs = shared_features(old_phi, new_phi, renames)
    copied = 0
    for name, axes_new in new_sets.items():
        source = renames.scope(name)
        if source not in old_sets:
            continue
        axes_old = old_sets[source]
        matched = 1
        for sets_new, sets_old in zip(axes_new, axes_old):
            seen: dict = {}
            old_keys = {}
            for s in sets_old:
                k = s & mask
                n = seen.get(k, 0)
                seen[k] = n + 1
                old_keys[(k, n)] = True
            seen = {}
            cache: dict = {}
            hits = 0
            for s in sets_new:
                t = cache.get(s)
                if t is None:
                    t = cache[s] = translate_bits(s, runs)
                n = seen.get(t, 0)
                seen[t] = n + 1
                hits += (t, n) in old_keys
            matched *= hits
        copied += matched
    total = sum(p.size for p in old_phi.params.values())
    return copied / total


def gradient_axis_sets(graph, method: str, batch: int) -> tuple[dict[str, list[list[int]]], int, float]:
    """Per-axis sets from a complete gradient map (an index's set: the features
    every element of its slice meets), the pairs found, and the seconds taken."""
    from specsurgery.backends.probe import gradient_map

    n = len(graph.features)
    shapes = {name: node.params[local].shape for name, (node, local) in graph.parameters().items()}
    per_axis = {name: [np.zeros((n, d), dtype=bool) for d in shape] for name, shape in shapes.items()}
    found = [0]

    def on_batch(chunk, masks):
        for name, m in masks.items():
            found[0] += int(m.sum())
            if m.ndim == 2:  # [features, d]
                per_axis[name][0][chunk.start:chunk.stop] = m
            else:
                per_axis[name][0][chunk.start:chunk.stop] = m.all(axis=2)
                per_axis[name][1][chunk.start:chunk.stop] = m.all(axis=1)

    start = time.perf_counter()
    gradient_map(graph, method, batch=batch, keep=False, on_batch=on_batch)
    seconds = time.perf_counter() - start
    sets = {}
    for name, axes in per_axis.items():
        out = []
        for a in axes:
            packed = np.packbits(a, axis=0, bitorder="little")  # [ceil(n/8), d]
            out.append([int.from_bytes(packed[:, i].tobytes(), "little") for i in range(a.shape[1])])
        sets[name] = out
    return sets, found[0], seconds


# ---------------------------------------------------------------------------


def time_full_gradient(graph, sample: int) -> tuple[float, int]:
    """Seconds per feature of the full-size gradient map, on `sample` features:
    one forward and backward pass per feature (per-sample gradients of a
    160M-parameter model do not fit a batch), the non-zero test included."""
    from specsurgery.backends.probe import probe_batches, probe_module

    module = probe_module(graph, "gradient")
    step = max(1, len(graph.features) // sample)
    times = []
    for chunk, inputs in probe_batches(graph, 1):
        if chunk.start % step:
            continue
        start = time.perf_counter()
        module.zero_grad(set_to_none=True)
        sum(o.sum() for o in module(inputs).values()).backward()
        [(p.grad != 0) for p in module.parameters() if p.grad is not None]
        times.append(time.perf_counter() - start)
        if len(times) > sample:
            break
    del module
    return statistics.median(times[1:]), len(times) - 1  # the first pass warms up


def child_peak(code: str) -> tuple[float, float, str]:
    """Run `code` in a fresh python; (seconds, peak RSS MB from VmHWM, its stdout)."""
    wrapper = code + "\nimport re\nprint('VmHWM', re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1))\n"
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", wrapper], capture_output=True, text=True, cwd=ROOT)
    seconds = time.perf_counter() - start
    if out.returncode != 0:
        raise RuntimeError(out.stderr)
    peak = int(re.search(r"VmHWM (\d+)", out.stdout).group(1)) / 1024
    return seconds, peak, out.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=int, default=16, help="width divisor of the pair the gradient rows are measured on")
    parser.add_argument("--sample", type=int, default=6, help="features timed for the full-size gradient map")
    parser.add_argument("--batch", type=int, default=32, help="features per probe batch at the scaled size")
    parser.add_argument("--states", type=int, default=1000, help="random states the full-size surgery is verified on")
    parser.add_argument("--quick", action="store_true", help="skip the full-size apply and verification")
    args = parser.parse_args()

    old_text, new_text = read("five.spec"), read("five_next.spec")
    t = time.perf_counter()
    old_spec, new_spec = only_model(old_text, "specs/five.spec"), only_model(new_text, "specs/five_next.spec")
    old_graph, new_graph = build_graph(old_spec), build_graph(new_spec)
    load_s = time.perf_counter() - t
    print(f"five.spec: {old_graph.parameter_count():,} parameters, {len(old_graph.features):,} input features; "
          f"five_next.spec: {new_graph.parameter_count():,} parameters, {len(new_graph.features):,} features "
          f"(parse + check + graph of both: {load_s:.2f} s)")
    renames = find_renames(old_spec, new_spec)

    # Boolean map at full size, timed like the paper (mean ± sd of repeats), both models.
    bool_times = []
    for _ in range(5):
        t = time.perf_counter()
        old_phi, new_phi = shadow_map(old_graph), shadow_map(new_graph)
        bool_times.append(time.perf_counter() - t)
    bool_transfer = map_only_transfer(old_phi, new_phi, axis_sets_from_boolean(old_phi), axis_sets_from_boolean(new_phi), renames)

    # Gradient map at full size: a sample of features, extrapolated.
    per_feature, sampled = time_full_gradient(new_graph, args.sample)
    n_features = len(old_graph.features) + len(new_graph.features)
    grad_full = per_feature * n_features
    print(f"full-size gradient map: {per_feature:.2f} s per feature (median of {sampled} sampled features, "
          f"one at a time), extrapolated to the {n_features:,} features of both models: {grad_full:,.0f} s")

    # Complete maps at 1/scale width.
    small_old = only_model(scaled(old_text, args.scale), "five.spec/scaled")
    small_new = only_model(scaled(new_text, args.scale), "five_next.spec/scaled")
    so_graph, sn_graph = build_graph(small_old), build_graph(small_new)
    so_phi, sn_phi = shadow_map(so_graph), shadow_map(sn_graph)
    bool_pairs = so_phi.pair_count() + sn_phi.pair_count()
    print(f"scaled pair (widths / {args.scale}): {so_graph.parameter_count():,} -> {sn_graph.parameter_count():,} parameters, "
          f"same {len(so_graph.features):,} / {len(sn_graph.features):,} features")
    rows = {}
    small_bool = map_only_transfer(so_phi, sn_phi, axis_sets_from_boolean(so_phi), axis_sets_from_boolean(sn_phi), renames)
    for method in ("gradient-positive", "gradient-random", "gradient"):
        old_sets, old_found, old_s = gradient_axis_sets(so_graph, method, args.batch)
        new_sets, new_found, new_s = gradient_axis_sets(sn_graph, method, args.batch)
        found = (old_found + new_found) / bool_pairs
        transfer = map_only_transfer(so_phi, sn_phi, old_sets, new_sets, renames)
        rows[method] = (found, transfer, old_s + new_s)
        print(f"  {method}: {100 * found:.2f}% found, {100 * transfer:.2f}% transferred, {old_s + new_s:.1f} s (scaled)")

    speedup = grad_full / statistics.mean(bool_times)
    print()
    print("Table 3, reproduced (paper's figures in brackets)")
    header = f"{'mapping':42} {'interactions found':>24} {'params transferred':>24} {'time (s)':>34}"
    print(header)
    print("-" * len(header))
    for method in ("gradient-positive", "gradient-random", "gradient"):
        found, transfer, secs = rows[method]
        paper = PAPER[method]
        when = f"{grad_full:,.0f} (extrapolated)" if method == "gradient" else "-"
        print(f"{LABELS[method]:42} {100 * found:>13.2f}% [{paper[0]:>7}] {100 * transfer:>13.2f}% [{paper[1]:>7}] "
              f"{when:>20} [{paper[2]:>11}]")
    mean, sd = statistics.mean(bool_times), statistics.stdev(bool_times)
    print(f"{LABELS['boolean']:42} {100.0:>13.2f}% [{PAPER['boolean'][0]:>7}] {100 * bool_transfer:>13.2f}% [{PAPER['boolean'][1]:>7}] "
          f"{f'{mean:.2f} ± {sd:.2f}':>20} [{PAPER['boolean'][2]:>11}]")
    print()
    print(f"boolean map vs gradient map at full size: {speedup:,.0f}x faster (paper: 24x; requirement: >= 100x)")
    print(f"gradient rows: found and transferred measured on complete maps of the scaled pair; boolean at that size: "
          f"{100 * small_bool:.2f}% transferred. Full-size gradient time extrapolated from {sampled} sampled features.")

    # The product's own plan at full size.
    t = time.perf_counter()
    plan = make_plan(old_spec, new_spec, old_phi, new_phi)
    plan_s = time.perf_counter() - t
    s = plan.summary
    print()
    print(f"product plan: {s.transferred:,} of {s.old_params:,} old parameters transferred "
          f"({100 * s.transfer_share:.2f}% of the original model; {100 * s.transferred / s.new_params:.2f}% of the new one), "
          f"{s.zeroed:,} zero, {s.fresh:,} fresh, function {'preserved' if s.function_preserving else 'NOT preserved'}; "
          f"planning took {plan_s:.2f} s (with both maps made)")
    if args.quick:
        return
    with tempfile.TemporaryDirectory(prefix="specsurgery-table3-") as tmp:
        old_ckpt, new_ckpt = os.path.join(tmp, "five.safetensors"), os.path.join(tmp, "five_next.safetensors")
        setup = ("import sys; sys.path.insert(0, '.')\n"
                 "from specsurgery.spec.load import load\nfrom specsurgery.ir import build_graph\n")
        secs, peak, _ = child_peak(setup + "from specsurgery.workflow.build import write_fresh\n"
                                   f"write_fresh(build_graph(load(['specs/five.spec']).model()), {old_ckpt!r}, seed=1)")
        print(f"wrote a full-size checkpoint ({os.path.getsize(old_ckpt) / 1e6:,.0f} MB) in {secs:.1f} s")
        import shutil

        copies = []
        for _ in range(3):
            t = time.perf_counter()
            shutil.copyfile(old_ckpt, new_ckpt)
            copies.append(time.perf_counter() - t)
        os.unlink(new_ckpt)
        apply_code = (setup + "from specsurgery.surgery.diff import make_plan\nfrom specsurgery.surgery.apply import apply_plan\n"
                      "from specsurgery.checkpoint import read_header, load_spec\nimport time\n"
                      "new = load(['specs/five_next.spec']).model()\n"
                      f"plan = make_plan(load_spec(read_header({old_ckpt!r})), new)\n"
                      f"t = time.perf_counter(); apply_plan(plan, {old_ckpt!r}, new, {new_ckpt!r}); print('APPLY', time.perf_counter() - t)\n")
        _, peak, out = child_peak(apply_code)
        apply_s = float(re.search(r"APPLY ([\d.]+)", out).group(1))
        copy_s = statistics.median(copies)
        print(f"apply: {apply_s:.2f} s, peak memory {peak:,.0f} MB; shutil.copyfile of the same file: {copy_s:.2f} s "
              f"-> apply / copy = {apply_s / copy_s:.2f}x")
        from specsurgery.surgery.verify import verify

        t = time.perf_counter()
        report = verify(old_ckpt, new_ckpt, states=args.states, steps=2, batch=50)
        print(f"verified on {report['states']} random states of {report['steps']} steps: largest output difference "
              f"{report['max']:.3g} ({', '.join(f'{h} {d:.2g}' for h, d in report['heads'].items())}) in {time.perf_counter() - t:.0f} s")


if __name__ == "__main__":
    main()
