"""Why surgery matters, shown: keep training after a feature is added, against starting over.

    python benchmarks/continue_training.py
    python benchmarks/continue_training.py --plot benchmarks/continue_training.png
    python benchmarks/continue_training.py --steps 1000 --pre-steps 2000 --seed 0   # the defaults

The task is a seeded synthetic regression:

    y = f(obs.x1..x4, obs.kind, items[*].v/w) + g(obs.wind) + noise

f is nonlinear (products, a sine, a per-kind bias and gain, a max over the
entity set): slow to learn. g(wind) = wind, a function of the feature the NEW
spec adds (inserted in the middle of the `obs` group), is easy to learn and
carries about a third of the variance. The OLD spec cannot see `wind`, so its
loss plateaus at about var(g).

 1. The OLD model trains for --pre-steps steps (default: twice --steps; Adam,
    MSE, fresh batches from a seeded generator, learning rate warmed up then
    decayed, as every run here) and is saved with write_checkpoint
    (canonical old spec).
 2. make_plan(old, new) + apply_plan write the surgered checkpoint; load_module
    reads it back. On the same held-out batch the surgered model's loss must
    equal the old model's loss (the function is preserved: the weights that read
    `wind` start at zero).
 3. The surgered model keeps training for --steps steps (a fresh Adam, as after
    loading any checkpoint, with the same warm-up and decay). Beside it the NEW
    spec trains from scratch (SpecModule(new_graph, seed)) for the same --steps
    steps on the same batches.
    The old model's pre-surgery steps were already spent before the spec
    changed, so both runs are compared over the steps after the change.

Every loss is the MSE on one fixed held-out batch of 2048 states, evaluated
after every 5th step. The script checks that its input tensors equal what
features.featurise makes of the same observations as JSON records.
Deterministic given --seed (one torch thread, seeded generators for data and
initialisation). Nothing is asserted; the numbers are printed.
"""
from __future__ import annotations

import argparse
import math
import os
import random
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

OLD_SPEC = """\
schema world {
  vocab kinds = [ground, air, water, fire]

  group obs {
    x1: float
    x2: float
    x3: float
    x4: float
    kind: category(kinds)
  }

  group items[8] {            # an entity set: up to 8 items per observation
    v: float
    w: float
  }
}

model regressor(s: world) {
  kind_e  = embed(s.obs.kind, 4)
  items_h = maxpool(relu(linear(s.items, 16)))
  h1      = relu(linear(concat(s.obs, kind_e, items_h), 64))
  h2      = relu(linear(h1, 64))
  out y   = linear(h2, 1)
}
"""

# The same, plus one feature in the middle of `obs` that the old inputs lack.
NEW_SPEC = OLD_SPEC.replace("    x2: float\n", "    x2: float\n    wind: float\n", 1)
assert NEW_SPEC != OLD_SPEC

KINDS = 4
MAX_ITEMS = 8
NOISE = 0.1  # std of the target noise: the best reachable MSE is NOISE**2
LR = 4e-3  # Adam's peak learning rate; every run warms up over WARMUP steps, then decays (cosine) to FINAL_LR * LR
WARMUP = 50
FINAL_LR = 0.1
BATCH = 256
HELD_OUT = 2048
EVAL_EVERY = 5  # held-out loss after every 5th step (and the last)


# ---------------------------------------------------------------------------
# data


def draw(n: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Raw values of every feature (the new spec's `wind` included) and the target."""
    x = torch.randn(n, 4, generator=gen)
    wind = torch.randn(n, generator=gen)
    kind = torch.randint(0, KINDS, (n,), generator=gen)
    count = torch.randint(1, MAX_ITEMS + 1, (n,), generator=gen)
    mask = (torch.arange(MAX_ITEMS)[None, :] < count[:, None]).float()
    items = torch.randn(n, MAX_ITEMS, 2, generator=gen) * mask[..., None]  # padding is zero, as featurise pads
    x1, x2, x3, x4 = x.unbind(-1)
    kind_bias = torch.tensor([-1.0, 0.5, 1.0, -0.5])[kind]
    kind_gain = torch.tensor([1.0, -1.0, 0.5, 2.0])[kind]
    best = (items[..., 0] + 0.5 * items[..., 1]).masked_fill(mask == 0, float("-inf")).amax(-1)
    f = torch.sin(2.0 * x1) * x2 + 0.5 * x3 * x4 + kind_bias + 0.5 * kind_gain * x3 + 0.7 * best
    g = wind  # what the new feature adds: a third of the variance, invisible to the old inputs
    y = f + g + NOISE * torch.randn(n, generator=gen)
    return {"x": x, "wind": wind, "kind": kind, "items": items, "mask": mask, "y": y[:, None], "f": f, "g": g}


def layout(schema, data: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model inputs under `schema`, in featurise's layout (numeric features in schema order)."""
    columns = {"x1": data["x"][:, 0], "x2": data["x"][:, 1], "x3": data["x"][:, 2], "x4": data["x"][:, 3],
               "wind": data["wind"]}
    obs = next(g for g in schema.groups if g.name == "obs")
    items = next(g for g in schema.groups if g.name == "items")
    item_columns = {"v": data["items"][..., 0], "w": data["items"][..., 1]}
    return {
        "obs": torch.stack([columns[f.name] for f in obs.numeric_features], dim=-1),
        "obs.kind": data["kind"],
        "items": torch.stack([item_columns[f.name] for f in items.numeric_features], dim=-1),
        "items#mask": data["mask"],
    }


def check_layout(schema, data: dict[str, torch.Tensor], n: int = 4) -> None:
    """Our tensors equal what featurise makes of the same observations as JSON records."""
    from specsurgery.features import featurise

    kinds = schema.vocab("kinds").item_names
    records = []
    for b in range(n):
        obs = {"x1": data["x"][b, 0].item(), "x2": data["x"][b, 1].item(), "x3": data["x"][b, 2].item(),
               "x4": data["x"][b, 3].item(), "kind": kinds[data["kind"][b].item()]}
        if any(f.name == "wind" for g in schema.groups for f in g.features):
            obs["wind"] = data["wind"][b].item()
        count = int(data["mask"][b].sum().item())
        items = [{"v": data["items"][b, j, 0].item(), "w": data["items"][b, j, 1].item()} for j in range(count)]
        records.append({"obs": obs, "items": items})
    ours = layout(schema, {k: v[:n] for k, v in data.items()})
    theirs = featurise(schema, records)
    for key, tensor in theirs.items():
        if not torch.equal(ours[key].to(tensor.dtype), tensor):
            raise SystemExit(f"internal error: input {key!r} differs from featurise's layout")


# ---------------------------------------------------------------------------
# training


def mse(module, inputs, y) -> float:
    with torch.no_grad():
        return torch.nn.functional.mse_loss(module(inputs)["y"], y).item()


def schedule(step: int, steps: int) -> float:
    """The learning-rate factor: linear warm-up over WARMUP steps, then cosine decay to FINAL_LR."""
    if step < WARMUP:
        return (step + 1) / WARMUP
    progress = (step - WARMUP) / max(1, steps - WARMUP)
    return FINAL_LR + (1 - FINAL_LR) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def train(module, schema, steps: int, data_seed: int, held_out: dict, curve: list[tuple[int, float]]) -> None:
    """Adam + MSE on fresh batches from a generator seeded with `data_seed`; appends
    (step, held-out loss) to `curve` after every EVAL_EVERY-th step and the last."""
    gen = torch.Generator().manual_seed(data_seed)
    opt = torch.optim.Adam(module.parameters(), lr=LR)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: schedule(i, steps))
    eval_inputs, eval_y = layout(schema, held_out), held_out["y"]
    module.train()
    for step in range(1, steps + 1):
        batch = draw(BATCH, gen)
        loss = torch.nn.functional.mse_loss(module(layout(schema, batch))["y"], batch["y"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % EVAL_EVERY == 0 or step == steps:
            curve.append((step, mse(module, eval_inputs, eval_y)))
    module.eval()


def first_at_or_below(curve: list[tuple[int, float]], target: float) -> int | None:
    """The first evaluated step at which the curve is at or below `target`."""
    for step, value in curve:
        if value <= target:
            return step
    return None


def at_step(curve: list[tuple[int, float]], step: int) -> tuple[int, float]:
    """The evaluation nearest to `step`."""
    return min(curve, key=lambda point: abs(point[0] - step))


# ---------------------------------------------------------------------------
# the picture


def plot(path: str, n1: int, n2: int, pre: list, post: list, scratch: list, old_loss: float, k: int | None,
         floor: float, plateau: float, subtitle: str) -> None:
    """Both runs on one log-scale axis; curves are lists of (step, loss) that start at step 0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from specsurgery.files import atomic_file

    def xy(curve, shift=0):
        return [step + shift for step, _ in curve], [loss for _, loss in curve]

    at_surgery = post[0][1]
    final = scratch[-1][1]
    fig, ax = plt.subplots(figsize=(10, 5.6), dpi=120)
    ax.axvspan(-n1, 0, color="0.93", zorder=0)
    ax.text(-n1 / 2, 0.97, "before the change:\nOLD spec trains (no 'wind' feature)", transform=ax.get_xaxis_transform(),
            ha="center", va="top", fontsize=9, color="0.3")
    ax.text(n2 / 2, 0.97, "after the change:\nNEW spec (adds 'wind')", transform=ax.get_xaxis_transform(),
            ha="center", va="top", fontsize=9, color="0.3")
    ax.plot(*xy(pre, -n1), color="0.45", lw=1.3, label="old spec, trained before the change")
    ax.plot(*xy(post), color="tab:blue", lw=1.6, label="new spec after surgery (continues from the old weights)")
    ax.plot(*xy(scratch), color="tab:orange", lw=1.6, label="new spec from scratch (same steps, same batches)")
    ax.axvline(0, color="black", lw=1.0)
    ax.annotate(f"surgery at step 0: loss unchanged\n({old_loss:.4f} before, {at_surgery:.4f} after)",
                xy=(0, at_surgery), xytext=(-0.62 * n1, at_surgery / 6), fontsize=9,
                arrowprops=dict(arrowstyle="->", color="black", lw=0.8))
    ax.axhline(plateau, color="0.45", lw=0.8, ls=":")
    ax.text(-n1, plateau * 0.9, f" var(g(wind)) = {plateau:.2f}: what the old inputs cannot explain",
            fontsize=8, color="0.35", va="top")
    ax.axhline(floor, color="tab:green", lw=0.8, ls=":")
    ax.text(n2, floor * 1.1, f"noise floor {floor:.4f} ", fontsize=8, color="tab:green", ha="right", va="bottom")
    ax.axhline(final, color="tab:orange", lw=0.8, ls="--", alpha=0.8)
    ax.text(n2, final * 0.9, f"scratch's final loss {final:.3f} ", fontsize=8, color="tab:orange", ha="right", va="top")
    if k is not None:
        reached = dict(post)[k]
        ax.plot([k], [reached], "o", color="tab:blue", ms=6, zorder=5)
        ax.annotate(f"surgery reaches scratch's final loss\nafter {k} of {n2} steps ({k / n2:.0%})",
                    xy=(k, reached), xytext=(k + 0.06 * n2, final * 6), fontsize=9, color="tab:blue",
                    arrowprops=dict(arrowstyle="->", color="tab:blue", lw=0.8))
    ax.set_yscale("log")
    ax.set_xlim(-n1, n2)
    ax.set_xlabel("training steps since the spec changed (negative: the old model's training before it)")
    ax.set_ylabel("held-out MSE (log scale)")
    ax.set_title("Continuing training after adding a feature: surgery vs. starting over", pad=22)
    ax.text(0.5, 1.015, subtitle, transform=ax.transAxes, ha="center", va="bottom", fontsize=8, color="0.35")
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(loc="lower left", fontsize=8.5, framealpha=0.95)
    fig.tight_layout()
    with atomic_file(path) as f:
        fig.savefig(f, format="png")
    plt.close(fig)


# ---------------------------------------------------------------------------


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1000,
                        help="steps after the change, for the surgered run and the from-scratch run alike (default 1000)")
    parser.add_argument("--pre-steps", type=int, default=None,
                        help="steps the old model trains before the change (default: twice --steps)")
    parser.add_argument("--seed", type=int, default=0, help="seed of data, initialisation and surgery (default 0)")
    parser.add_argument("--plot", metavar="FILE.png", help="draw both loss curves into this PNG")
    args = parser.parse_args(argv)
    n1 = args.pre_steps if args.pre_steps is not None else 2 * args.steps
    n2 = args.steps
    if n1 < 1 or n2 < 1:
        parser.error("--steps and --pre-steps must be at least 1")

    from specsurgery.backends.torch import SpecModule
    from specsurgery.checkpoint import write_checkpoint
    from specsurgery.ir import build_graph
    from specsurgery.spec.canonical import canonical
    from specsurgery.spec.load import load_text
    from specsurgery.surgery.apply import apply_plan
    from specsurgery.surgery.diff import make_plan
    from specsurgery.surgery.verify import load_module

    t_start = time.perf_counter()
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    old_spec = load_text(OLD_SPEC, "old.spec").model()
    new_spec = load_text(NEW_SPEC, "new.spec").model()
    old_graph, new_graph = build_graph(old_spec), build_graph(new_spec)

    held_out = draw(HELD_OUT, torch.Generator().manual_seed(10_000 + args.seed))
    check_layout(old_spec.schema, held_out)
    check_layout(new_spec.schema, held_out)
    floor = NOISE ** 2
    plateau = held_out["g"].var().item()
    print(f"continue_training: seed {args.seed}, {n1} steps before the change, {n2} after; "
          f"batch {BATCH}, Adam lr {LR}, held-out batch of {HELD_OUT}")
    print(f"task: y = f(old features) + g(wind) + noise; held-out var(f) {held_out['f'].var().item():.3f}, "
          f"var(g) {plateau:.3f}, noise floor {floor:.4f}")
    print(f"model: {old_graph.parameter_count():,} parameters (old spec), {new_graph.parameter_count():,} (new spec)")

    # 1. the old model
    old = SpecModule(old_graph, seed=args.seed)
    old.eval()
    pre = [(0, mse(old, layout(old_spec.schema, held_out), held_out["y"]))]
    t = time.perf_counter()
    train(old, old_spec.schema, n1, 1 + 2 * args.seed, held_out, pre)
    t_old = time.perf_counter() - t
    old_loss = mse(old, layout(old_spec.schema, held_out), held_out["y"])
    print(f"old spec after {n1} steps: held-out loss {old_loss:.6f} ({t_old:.1f} s)")

    with tempfile.TemporaryDirectory(prefix="specsurgery-continue-") as tmp:
        # 2. checkpoint, plan, apply, load
        old_path = os.path.join(tmp, "old.safetensors")
        new_path = os.path.join(tmp, "new.safetensors")
        state = old.state_dict()
        write_checkpoint(old_path, canonical(old_spec), old_spec.model.name,
                         {name: tuple(v.shape) for name, v in state.items()}, state.items())
        t = time.perf_counter()
        plan = make_plan(old_spec, new_spec)
        apply_plan(plan, old_path, new_spec, new_path, seed=args.seed)
        _, surgered = load_module(new_path)
        t_surgery = time.perf_counter() - t
        s = plan.summary
        print(f"surgery ({t_surgery:.2f} s): copied {s.transferred:,} of {s.old_params:,} old parameters, "
              f"{s.zeroed:,} zeroed, {s.fresh:,} fresh; function preserving: {s.function_preserving}")

    new_inputs = layout(new_spec.schema, held_out)
    at_surgery = mse(surgered, new_inputs, held_out["y"])
    with torch.no_grad():
        out_diff = (surgered(new_inputs)["y"] - old(layout(old_spec.schema, held_out))["y"]).abs().max().item()
    print(f"loss right after surgery: {at_surgery:.6f} (old model: {old_loss:.6f}, |diff| {abs(at_surgery - old_loss):.2e}); "
          f"largest |output difference| on the {HELD_OUT} held-out states: {out_diff:.2e}")

    # 3. continue the surgered model; the new spec from scratch beside it, same steps and batches
    post = [(0, at_surgery)]
    t = time.perf_counter()
    train(surgered, new_spec.schema, n2, 2 + 2 * args.seed, held_out, post)
    t_post = time.perf_counter() - t
    scratch_model = SpecModule(new_graph, seed=args.seed)
    scratch_model.eval()
    scratch = [(0, mse(scratch_model, new_inputs, held_out["y"]))]
    t = time.perf_counter()
    train(scratch_model, new_spec.schema, n2, 2 + 2 * args.seed, held_out, scratch)
    t_scratch = time.perf_counter() - t

    final_scratch, final_surgery = scratch[-1][1], post[-1][1]
    k = first_at_or_below(post, final_scratch)
    print(f"comparison: the surgered model's {n2} continued steps against the new spec trained from scratch "
          f"for the same {n2} steps on the same batches ({t_post:.1f} s and {t_scratch:.1f} s); "
          f"the old model's {n1} steps were spent before the change")
    if k is None:
        print(f"surgery reaches the from-scratch final loss ({final_scratch:.6f}) after - of {n2} steps (never)")
    else:
        print(f"surgery reaches the from-scratch final loss ({final_scratch:.6f}) after {k} of {n2} steps "
              f"(fraction {k / n2:.3f})")
    print(f"final loss: surgery {final_surgery:.6f} vs scratch {final_scratch:.6f} "
          f"(ratio {final_scratch / final_surgery:.2f}x; noise floor {floor:.4f})")
    shown = sorted({at_step(post[1:], frac * n2)[0] for frac in (0.1, 0.25, 0.5)} - {n2})
    for i in shown:
        print(f"  after {i:>5} steps: surgery {dict(post)[i]:.6f}, scratch {dict(scratch)[i]:.6f}")

    if args.plot:
        subtitle = (f"seed {args.seed}; batch {BATCH}; Adam, peak lr {LR:g}, {WARMUP}-step warm-up and cosine decay in every run; "
                    f"held-out MSE on {HELD_OUT} states every {EVAL_EVERY} steps")
        plot(args.plot, n1, n2, pre, post, scratch, old_loss, k, floor, plateau, subtitle)
        print(f"plot written to {args.plot}")
    print(f"total time {time.perf_counter() - t_start:.1f} s")


if __name__ == "__main__":
    main()
