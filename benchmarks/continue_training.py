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
    decayed, as every run here) and is saved with its Adam state
    (model.save(path, optimizer=adam)).
 2. make_plan(old, new) + apply_plan write the surgered checkpoint, and
    carry_optimizer_file the optimizer file beside it (what `specsurgery apply`
    does); ss.load reads it back. On the same held-out batch the surgered
    model's loss must equal the old model's loss (the function is preserved:
    the weights that read `wind` start at zero).
 3. The surgered model keeps training for --steps steps, four ways, each on the
    same batches with the same warm-up and decay:
      - fresh Adam: as after loading any checkpoint;
      - carried Adam: the old run's Adam, carried by the plan (ss.load_optimizer
        of the file apply wrote);
      - lr 0 for 50 steps, then carried (OpenAI Five's way: the moments adapt
        to the new parameters before any update);
      - carried, new second moments zero: the obvious carry the issue tried.
    Beside them the NEW spec trains from scratch for the same --steps steps.
    The old model's pre-surgery steps were already spent before the spec
    changed, so the runs are compared over the steps after the change.
    For each: the size of the first 10 updates after surgery (RMS per element,
    per unit of learning rate, over all elements and over the new ones)
    relative to the old run's last 10, the loss jump (the highest held-out loss
    in the first 50 steps over the loss at surgery) and the steps taken to
    reach the from-scratch model's final loss.

Every loss is the MSE on one fixed held-out batch of 2048 states, evaluated
after every 5th step. The script checks that its input tensors equal what
features.featurise makes of the same observations as JSON records.
Deterministic given --seed (one torch thread, seeded generators for data and
initialisation). Nothing is asserted; the numbers are printed.
"""
from __future__ import annotations

import argparse
import copy
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
HOLD = 50  # OpenAI Five's way: steps at learning rate 0 after surgery, the carried moments adapting
FIRST = 10  # the first updates after surgery, compared with the old run's last ones
JUMP_WINDOW = 50  # the loss jump: the highest held-out loss in this many steps after surgery


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


def fresh_adam(module, steps: int):
    """Adam with warm-up then cosine decay over `steps` (what every fresh start here uses)."""
    opt = torch.optim.Adam(module.parameters(), lr=LR)
    return opt, (lambda i: schedule(i, steps))


def train(module, schema, steps: int, data_seed: int, held_out: dict, curve: list[tuple[int, float]],
          optimizer=None, lr_factor=None, updates: list | None = None, new_masks: dict | None = None) -> None:
    """MSE on fresh batches from a generator seeded with `data_seed`; appends
    (step, held-out loss) to `curve` after every EVAL_EVERY-th step and the last.
    Without `optimizer`: a fresh Adam with the warm-up and decay schedule.
    `lr_factor(i)` scales LR at step i (from 0). With `updates`, appends per step
    (RMS of the update over all elements / lr, and over the elements of
    `new_masks` (name -> bool mask) / lr); steps at lr 0 append None."""
    if optimizer is None:
        optimizer, lr_factor = fresh_adam(module, steps)
    gen = torch.Generator().manual_seed(data_seed)
    eval_inputs, eval_y = layout(schema, held_out), held_out["y"]
    params = dict(module.named_parameters())
    module.train()
    for step in range(1, steps + 1):
        lr = LR * lr_factor(step - 1)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = draw(BATCH, gen)
        loss = torch.nn.functional.mse_loss(module(layout(schema, batch))["y"], batch["y"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        before = {n: p.detach().clone() for n, p in params.items()} if updates is not None else None
        optimizer.step()
        if updates is not None:
            if lr == 0:
                updates.append(None)
            else:
                deltas = {n: (p.detach() - before[n]) / lr for n, p in params.items()}
                every = torch.cat([d.flatten() for d in deltas.values()])
                new = [deltas[n][m] for n, m in (new_masks or {}).items() if m.any()]
                updates.append((every.square().mean().sqrt().item(),
                                torch.cat(new).square().mean().sqrt().item() if new else float("nan")))
        if step % EVAL_EVERY == 0 or step == steps:
            curve.append((step, mse(module, eval_inputs, eval_y)))
    module.eval()


def new_element_masks(plan) -> dict:
    """Per new parameter, the elements no run copies (they start by the optimizer's rule)."""
    from specsurgery.surgery.apply import copy_runs

    out = {}
    for p in plan.params:
        if p.source is None:
            out[p.name] = torch.ones(p.shape, dtype=torch.bool)
        else:
            out[p.name] = ~copy_runs(p, torch.ones(p.old_shape, dtype=torch.bool), torch.zeros(p.shape, dtype=torch.bool))
    return out


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


def plot(path: str, n1: int, n2: int, pre: list, posts: dict, main_label: str, scratch: list, old_loss: float,
         k: int | None, floor: float, plateau: float, subtitle: str) -> None:
    """Every run on one log-scale axis; curves are lists of (step, loss) that start at step 0;
    `posts` holds the continuations after surgery, `main_label` the one annotated."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from specsurgery.files import atomic_file

    def xy(curve, shift=0):
        return [step + shift for step, _ in curve], [loss for _, loss in curve]

    post = posts[main_label]
    at_surgery = post[0][1]
    final = scratch[-1][1]
    fig, ax = plt.subplots(figsize=(10, 5.6), dpi=120)
    ax.axvspan(-n1, 0, color="0.93", zorder=0)
    ax.text(-n1 / 2, 0.97, "before the change:\nOLD spec trains (no 'wind' feature)", transform=ax.get_xaxis_transform(),
            ha="center", va="top", fontsize=9, color="0.3")
    ax.text(n2 / 2, 0.97, "after the change:\nNEW spec (adds 'wind')", transform=ax.get_xaxis_transform(),
            ha="center", va="top", fontsize=9, color="0.3")
    ax.plot(*xy(pre, -n1), color="0.45", lw=1.3, label="old spec, trained before the change")
    colors = iter(["tab:red", "tab:purple", "tab:brown", "tab:cyan"])
    for label, curve in posts.items():
        main = label == main_label
        ax.plot(*xy(curve), color="tab:blue" if main else next(colors), lw=1.6 if main else 1.0,
                alpha=1.0 if main else 0.8, label=f"after surgery: {label}")
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

    import specsurgery as ss
    from specsurgery.ir import build_graph
    from specsurgery.optimizer_state import carry_optimizer_file
    from specsurgery.spec.load import load_text
    from specsurgery.surgery.apply import apply_plan
    from specsurgery.surgery.diff import make_plan

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

    # 1. the old model, with its Adam (kept: the carried continuations start from it)
    old = ss.compile(OLD_SPEC, seed=args.seed)
    old.eval()
    pre = [(0, mse(old, layout(old_spec.schema, held_out), held_out["y"]))]
    pre_updates: list = []
    old_opt, old_lr = fresh_adam(old, n1)
    t = time.perf_counter()
    train(old, old_spec.schema, n1, 1 + 2 * args.seed, held_out, pre, old_opt, old_lr, pre_updates)
    t_old = time.perf_counter() - t
    old_loss = mse(old, layout(old_spec.schema, held_out), held_out["y"])
    print(f"old spec after {n1} steps: held-out loss {old_loss:.6f} ({t_old:.1f} s)")

    with tempfile.TemporaryDirectory(prefix="specsurgery-continue-") as tmp:
        # 2. checkpoint (with its optimizer), plan, apply, load
        old_path = os.path.join(tmp, "old.safetensors")
        new_path = os.path.join(tmp, "new.safetensors")
        old.save(old_path, optimizer=old_opt)
        t = time.perf_counter()
        plan = make_plan(old_spec, new_spec)
        apply_plan(plan, old_path, new_spec, new_path, seed=args.seed)
        carry_optimizer_file(plan, old_path, new_path)
        surgered = ss.load(new_path)
        surgered.eval()
        t_surgery = time.perf_counter() - t
        s = plan.summary
        print(f"surgery ({t_surgery:.2f} s): copied {s.transferred:,} of {s.old_params:,} old parameters, "
              f"{s.zeroed:,} zeroed, {s.fresh:,} fresh; function preserving: {s.function_preserving}")

        def carried(model):
            """The old run's Adam carried to `model` through the optimizer file apply wrote."""
            return ss.load_optimizer(new_path, model)

        new_inputs = layout(new_spec.schema, held_out)
        at_surgery = mse(surgered, new_inputs, held_out["y"])
        with torch.no_grad():
            out_diff = (surgered(new_inputs)["y"] - old(layout(old_spec.schema, held_out))["y"]).abs().max().item()
        print(f"loss right after surgery: {at_surgery:.6f} (old model: {old_loss:.6f}, |diff| "
              f"{abs(at_surgery - old_loss):.2e}); largest |output difference| on the {HELD_OUT} held-out states: "
              f"{out_diff:.2e}")

        # 3. continuations of the surgered model, each on the same batches; the new spec from scratch beside them
        masks = new_element_masks(plan)
        hold = min(HOLD, n2 // 2)

        def naive(model):
            """The obvious carry the issue tried: new second moments zero, the old step count."""
            opt = carried(model)
            opt._ss_awaiting_gradient.clear()  # no start at the first gradient: the zeros stay
            for name, p in model.named_parameters():
                if p in opt.state:
                    opt.state[p]["exp_avg_sq"][masks[name]] = 0.0
            return opt

        runs = {
            "fresh Adam": (None, None),
            "carried Adam": (carried, lambda i: schedule(i, n2)),
            f"lr 0 for {hold} steps, then carried": (carried, lambda i: 0.0 if i < hold else schedule(i - hold, n2 - hold)),
            "carried, new second moments zero (naive)": (naive, lambda i: schedule(i, n2)),
        }
        posts, update_logs, times = {}, {}, {}
        for label, (make_opt, lr_factor) in runs.items():
            model = copy.deepcopy(surgered)
            curve, log = [(0, at_surgery)], []
            t = time.perf_counter()
            train(model, new_spec.schema, n2, 2 + 2 * args.seed, held_out, curve,
                  make_opt(model) if make_opt else None, lr_factor, log, masks)
            times[label] = time.perf_counter() - t
            posts[label], update_logs[label] = curve, log

    scratch_model = ss.compile(NEW_SPEC, seed=args.seed)
    scratch_model.eval()
    scratch = [(0, mse(scratch_model, new_inputs, held_out["y"]))]
    t = time.perf_counter()
    train(scratch_model, new_spec.schema, n2, 2 + 2 * args.seed, held_out, scratch)
    t_scratch = time.perf_counter() - t

    final_scratch = scratch[-1][1]
    before = [u[0] for u in pre_updates[-FIRST:]]
    before_rms = sum(before) / len(before)
    print(f"comparison over the {n2} steps after the change, every run on the same batches; the new spec from "
          f"scratch ({t_scratch:.1f} s) ends at {final_scratch:.6f}. Update sizes are RMS per element per unit of "
          f"learning rate, over the first {FIRST} steps with lr > 0 after surgery, relative to the old run's last "
          f"{FIRST} steps ({before_rms:.3g})")
    rows = []
    for label, curve in posts.items():
        first = [u for u in update_logs[label] if u is not None][:FIRST]
        every = sum(u[0] for u in first) / len(first) / before_rms
        new = sum(u[1] for u in first) / len(first) / before_rms
        jump = max(loss for step, loss in curve if step <= JUMP_WINDOW) / at_surgery
        k = first_at_or_below(curve, final_scratch)
        rows.append((label, every, new, jump, k, curve[-1][1]))
    print(f"  {'continuation':<44} {'first updates':>13} {'new elements':>12} {'loss jump':>9} "
          f"{'steps to scratch final':>22} {'final loss':>10}")
    for label, every, new, jump, k, final in rows:
        reached = f"{k} of {n2}" if k is not None else f"never in {n2}"
        print(f"  {label:<44} {every:>12.2f}x {new:>11.2f}x {jump:>8.3f}x {reached:>22} {final:>10.6f}")
    print(f"  (loss jump: the highest held-out loss in the first {JUMP_WINDOW} steps / the loss at surgery)")

    if args.plot:
        subtitle = (f"seed {args.seed}; batch {BATCH}; Adam, peak lr {LR:g}, {WARMUP}-step warm-up and cosine decay; "
                    f"held-out MSE on {HELD_OUT} states every {EVAL_EVERY} steps")
        main_label = "carried Adam"
        plot(args.plot, n1, n2, pre, posts, main_label, scratch, old_loss, first_at_or_below(posts[main_label], final_scratch),
             floor, plateau, subtitle)
        print(f"plot written to {args.plot}")
    print(f"total time {time.perf_counter() - t_start:.1f} s")

if __name__ == "__main__":
    main()
