"""Train, save, change the spec, do the surgery in memory, keep training.

    python examples/train_and_grow.py [--steps 300] [--out /tmp/grow]

A small policy learns a target that depends on a feature it does not have
yet (`wind`). Half way, the spec gains that feature; ss.surgery carries every
trained weight over (the weights reading `wind` start at zero, so the loss
right after surgery is the old model's), and training goes on with one
import: `import specsurgery as ss`.
"""
from __future__ import annotations

import argparse
import os
import tempfile

import numpy as np
import torch

import specsurgery as ss

V1 = """
schema world {
  vocab terrain = [grass, sand, rock]
  group me {
    speed: float
    heading: float
    ground: category(terrain)
  }
  group others[8] {
    dx: float
    dy: float
  }
}

model agent(obs: world) {
  ground = embed(obs.me.ground, 4)
  me = relu(linear(concat(obs.me, ground), 32))
  crowd = maxpool(relu(linear(obs.others, 16)))
  out value = linear(concat(me, crowd), 1)
}
"""
# version 2: the observation gains `wind`; everything else is as it was
V2 = V1.replace("    heading: float\n", "    heading: float\n    wind: float\n")


def batch(rng: np.random.Generator, size: int, with_wind: bool) -> tuple[dict, torch.Tensor]:
    """Columns as a training loop holds them, and the target."""
    speed, heading, wind = (rng.normal(size=size).astype(np.float32) for _ in range(3))
    ground = rng.integers(0, 3, size=size)
    count = rng.integers(0, 9, size=size)
    others = rng.normal(size=(size, 8, 2)).astype(np.float32) * (np.arange(8) < count[:, None])[..., None]
    target = speed * heading + 0.5 * ground + 0.1 * count + 2.0 * wind
    me = {"speed": speed, "heading": heading, "ground": ground}
    if with_wind:
        me["wind"] = wind
    return {"me": me, "others": others, "others#count": count}, torch.as_tensor(target).unsqueeze(1)


def train(model: ss.Model, steps: int, rng: np.random.Generator, with_wind: bool, label: str) -> float:
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    loss = torch.tensor(float("nan"))
    for step in range(steps):
        columns, target = batch(rng, 256, with_wind)
        loss = torch.nn.functional.mse_loss(model(model.inputs(columns))["value"], target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % max(1, steps // 4) == 0 or step == steps - 1:
            print(f"{label} step {step:4d}: loss {loss.item():.4f}")
    return loss.item()


def held_out_loss(model: ss.Model, with_wind: bool) -> float:
    columns, target = batch(np.random.default_rng(12345), 2048, with_wind)
    with torch.no_grad():
        return torch.nn.functional.mse_loss(model(model.inputs(columns))["value"], target).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="training steps before and after the surgery")
    parser.add_argument("--out", default=None, help="folder for the checkpoints (default: a temporary one)")
    args = parser.parse_args()
    out = args.out or tempfile.mkdtemp(prefix="specsurgery-example-")
    torch.manual_seed(0)
    rng = np.random.default_rng(0)

    model = ss.compile(V1, seed=0)
    print(f"model {model.name}: {sum(p.numel() for p in model.parameters()):,} parameters, features {model.features}")
    train(model, args.steps, rng, with_wind=False, label="v1")
    path = os.path.join(out, "agent.safetensors")
    model.save(path, metadata={"steps": str(args.steps)})
    print(f"saved {path}")

    # The spec changes; the trained model comes along.
    grown = ss.surgery(ss.load(path), V2)
    s = grown.plan.summary
    print(f"surgery: {s.transferred:,} of {s.old_params:,} weights carried over, {s.zeroed} zero, {s.fresh} fresh; "
          f"function {'preserved' if grown.plan.function_preserving else 'NOT preserved'}")
    before, after = held_out_loss(model, with_wind=False), held_out_loss(grown.model, with_wind=True)
    print(f"held-out loss: {before:.6f} before the surgery, {after:.6f} right after")
    check = ss.verify(model, grown.model, states=200)
    print(f"verify: largest difference {check.largest:.3g} over {check.states} random states, ok={check.ok}")

    train(grown.model, args.steps, rng, with_wind=True, label="v2")
    final = held_out_loss(grown.model, with_wind=True)
    grown.model.save(os.path.join(out, "agent.safetensors"))
    print(f"held-out loss after training on with wind: {final:.6f}; saved with metadata {ss.load(path).metadata}")


if __name__ == "__main__":
    main()
