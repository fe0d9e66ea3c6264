"""One plan, many checkpoints: 8 checkpoints (each with its Adam state beside
it) carried over to a new spec by one pool apply, against 8 separate applies,
measured in the same run.

    python benchmarks/pool_apply.py                   # 8 checkpoints, 2 workers
    python benchmarks/pool_apply.py --checkpoints 8 --jobs 2 --width 1024

The old spec has a group of 128 floats and two hidden layers of --width units;
the new one inserts a feature in the middle of the group and widens both
hidden layers by 16 units, so every large parameter grows (nothing is only
copied file to file). Each checkpoint is written by model.save(optimizer=Adam
after one step).

- separate: for each checkpoint, what `ss.apply` / `specsurgery apply` does
  for one: read its spec, make the plan, apply it, carry the optimizer file.
- pool: the plan made once, then many_apply.apply_many (worker processes,
  spawned, each importing torch) over all of them.

Both write with durable=False (no fsync) so the disk's flush time, shared with
every other process on the machine, is not what is measured. The outputs are
compared byte for byte, checkpoint and optimizer file, and the ratio
pool / separate is printed. Nothing is asserted.
"""
from __future__ import annotations

import argparse
import filecmp
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def old_spec(width: int) -> str:
    features = "\n".join(f"    f{i}: float" for i in range(128))
    return f"""schema s {{
  group obs {{
{features}
  }}
}}
model m(o: s) {{
  h1 = relu(linear(o.obs, {width}))
  h2 = relu(linear(h1, {width}))
  out y = linear(h2, 8)
}}
"""


def new_spec(width: int) -> str:
    text = old_spec(width).replace("    f64: float\n", "    f64: float\n    wind: float\n")
    return text.replace(f"linear(o.obs, {width})", f"linear(o.obs, {width + 16})").replace(
        f"linear(h1, {width})", f"linear(h1, {width + 16})")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoints", type=int, default=8)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--width", type=int, default=1024)
    args = parser.parse_args(argv)

    import torch

    import specsurgery as ss
    from specsurgery.api import read_spec
    from specsurgery.checkpoint import load_spec, optimizer_path, read_header
    from specsurgery.many_apply import apply_many
    from specsurgery.optimizer_state import carry_optimizer_file
    from specsurgery.surgery.apply import apply_plan
    from specsurgery.surgery.diff import make_plan

    torch.set_num_threads(1)
    old_text, new_text = old_spec(args.width), new_spec(args.width)
    with tempfile.TemporaryDirectory(prefix="specsurgery-pool-") as tmp:
        olds = []
        for k in range(args.checkpoints):
            model = ss.compile(old_text, seed=k)
            opt = torch.optim.Adam(model.parameters(), lr=1e-3)
            x = torch.randn(32, 128, generator=torch.Generator().manual_seed(k))
            model({"obs": x})["y"].square().mean().backward()
            opt.step()
            path = os.path.join(tmp, f"ckpt{k}.safetensors")
            model.save(path, optimizer=opt)
            olds.append(path)
        size = os.path.getsize(olds[0]) + os.path.getsize(optimizer_path(olds[0]))
        params = sum(p.numel() for p in model.parameters())
        print(f"pool_apply: {args.checkpoints} checkpoints of {params:,} parameters "
              f"({size / 1e6:.0f} MB each with its Adam state), {args.jobs} workers, {os.cpu_count()} cores")

        new = read_spec(new_text)
        separate_dir = os.path.join(tmp, "separate")
        os.makedirs(separate_dir)
        t = time.perf_counter()
        for path in olds:
            out = os.path.join(separate_dir, os.path.basename(path))
            plan = make_plan(load_spec(read_header(path)), new)
            apply_plan(plan, path, new, out, durable=False)
            carry_optimizer_file(plan, path, out, durable=False)
        separate = time.perf_counter() - t

        t = time.perf_counter()
        plan = make_plan(load_spec(read_header(olds[0])), new)
        outcomes = apply_many(plan, olds, os.path.join(tmp, "pool"), jobs=args.jobs, durable=False)
        pool = time.perf_counter() - t

        failed = [o for o in outcomes if o.error]
        differ = [o.checkpoint for o in outcomes if not o.error and not (
            filecmp.cmp(o.output, os.path.join(separate_dir, os.path.basename(o.checkpoint)), shallow=False)
            and filecmp.cmp(o.optimizer, optimizer_path(os.path.join(separate_dir, os.path.basename(o.checkpoint))),
                            shallow=False))]
        same = not differ and not failed
        print(f"separate applies: {separate:.2f} s ({separate / args.checkpoints:.2f} s each)")
        print(f"pool apply:       {pool:.2f} s ({len(outcomes) - len(failed)} written, {len(failed)} failed)")
        print(f"outputs equal to the separate applies, byte for byte (checkpoints and optimizer files): {same}"
              + (f" (differ: {', '.join(differ)})" if differ else ""))
        print(f"ratio pool / separate: {pool / separate:.2f}")


if __name__ == "__main__":
    main()
