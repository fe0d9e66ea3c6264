"""One plan, many checkpoints: 8 checkpoints (each with its Adam state beside
it) carried over to a new spec by one `specsurgery apply` with a pool of
workers, against 8 separate `specsurgery apply` commands, measured in the same run.

    python benchmarks/pool_apply.py                   # 8 checkpoints, 2 workers
    python benchmarks/pool_apply.py --checkpoints 8 --jobs 2 --width 2048

The old spec has a group of 128 floats and two hidden layers of --width units;
the new one inserts a feature in the middle of the group and widens both
hidden layers by 16 units, so every large parameter grows (nothing is only
copied file to file). Each checkpoint is written by model.save(optimizer=Adam
after one step).

- separate: `specsurgery apply CKPT NEW_SPEC -o OUT`, once per checkpoint, one
  after the other (each reads the spec, makes the plan, applies it and
  carries the optimizer file);
- pool: `specsurgery apply CKPT... NEW_SPEC -o OUTDIR --jobs 2`: the plan made
  once, the checkpoints applied in worker processes;
- in-process (for reference): the separate applies' work in this process,
  one after the other, with no interpreter start-up (make_plan, apply_plan,
  carry_optimizer_file; durable as the commands are).

The outputs are compared byte for byte, checkpoint and optimizer file, and the
ratios are printed. Nothing is asserted.
"""
from __future__ import annotations

import argparse
import filecmp
import json
import os
import subprocess
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
    from specsurgery.many_apply import Outcome
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

        spec_path = os.path.join(tmp, "new.spec")
        with open(spec_path, "w") as f:
            f.write(new_text)
        command = [sys.executable, "-m", "specsurgery"]
        separate_dir = os.path.join(tmp, "separate")
        t = time.perf_counter()
        for path in olds:
            subprocess.run([*command, "apply", path, spec_path, "-o", os.path.join(separate_dir, os.path.basename(path)),
                            "--json"], check=True, stdout=subprocess.DEVNULL)
        separate = time.perf_counter() - t

        pool_dir = os.path.join(tmp, "pool")
        t = time.perf_counter()
        done = subprocess.run([*command, "apply", *olds, spec_path, "-o", pool_dir, "--jobs", str(args.jobs), "--json"],
                              stdout=subprocess.PIPE, text=True)
        pool = time.perf_counter() - t
        outcomes = [Outcome(**o) for o in json.loads(done.stdout)["outputs"]]

        new = read_spec(new_text)
        inproc_dir = os.path.join(tmp, "inproc")
        t = time.perf_counter()
        for path in olds:
            out = os.path.join(inproc_dir, os.path.basename(path))
            plan = make_plan(load_spec(read_header(path)), new)
            apply_plan(plan, path, new, out)
            carry_optimizer_file(plan, path, out)
        inproc = time.perf_counter() - t

        failed = [o for o in outcomes if o.error]
        differ = [o.checkpoint for o in outcomes if not o.error and not (
            filecmp.cmp(o.output, os.path.join(separate_dir, os.path.basename(o.checkpoint)), shallow=False)
            and filecmp.cmp(o.optimizer, optimizer_path(os.path.join(separate_dir, os.path.basename(o.checkpoint))),
                            shallow=False))]
        same = not differ and not failed
        print(f"separate commands:     {separate:.2f} s ({separate / args.checkpoints:.2f} s each)")
        print(f"one command, a pool:   {pool:.2f} s ({len(outcomes) - len(failed)} written, {len(failed)} failed)")
        print(f"in-process, one by one: {inproc:.2f} s (reference: no interpreter start-up)")
        print(f"outputs equal to the separate applies, byte for byte (checkpoints and optimizer files): {same}"
              + (f" (differ: {', '.join(differ)})" if differ else ""))
        print(f"ratio pool / separate commands: {pool / separate:.2f}; pool / in-process one by one: {pool / inproc:.2f}")


if __name__ == "__main__":
    main()
