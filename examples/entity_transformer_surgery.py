"""Surgery on an entity-transformer agent: two new unit features and a fifth
attention head, carried over from a trained checkpoint.

    python examples/entity_transformer_surgery.py [--out DIR]

1. compile specs/entity_transformer.spec (attention blocks over units, a GRU
   core, a pointer head), train it for a few steps on random observations and
   save the checkpoint;
2. `specsurgery plan` and `specsurgery apply` onto
   examples/entity_transformer_next.spec;
3. `specsurgery verify`: both models on 1,000 random states of 3 steps, the
   largest difference per head (padding scores, -inf on both sides, count as
   equal);
4. the new model's heads on one observation, next to the old model's.
"""
from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile

import torch

import specsurgery as ss

HERE = os.path.dirname(os.path.abspath(__file__))
OLD_SPEC = os.path.join(HERE, "..", "specs", "entity_transformer.spec")
NEW_SPEC = os.path.join(HERE, "entity_transformer_next.spec")
KINDS = ["worker", "soldier", "tower", "scout"]


def observation(rng: random.Random, new_features: bool = False) -> dict:
    def unit():
        u = {"x": rng.uniform(-1, 1), "y": rng.uniform(-1, 1), "health": rng.random(), "mine": rng.random() < 0.5,
             "kind": rng.choice(KINDS)}
        if new_features:
            u.update(shield=rng.random(), cooldown=rng.random())
        return u

    return {"me": {"health": rng.random(), "energy": rng.random(), "gold": rng.uniform(0, 5)},
            "units": [unit() for _ in range(rng.randint(0, 12))]}


def episodes(rng: random.Random, batch: int, steps: int, new_features: bool = False) -> list:
    return [[observation(rng, new_features) for _ in range(steps)] for _ in range(batch)]


def specsurgery(*args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "specsurgery", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(done.stdout + done.stderr)
    return done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", help="where the checkpoints go (default: a temporary folder)")
    args = parser.parse_args()
    out = args.out or tempfile.mkdtemp(prefix="entity_transformer_")
    os.makedirs(out, exist_ok=True)
    old_ckpt, new_ckpt = os.path.join(out, "agent.safetensors"), os.path.join(out, "agent_next.safetensors")

    # 1. a model that has learnt something: value regresses the player's gold
    rng = random.Random(0)
    torch.manual_seed(0)
    model = ss.compile(OLD_SPEC)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(30):
        records = episodes(rng, 16, 3)
        heads = model(model.featurise(records))
        gold = torch.tensor([[obs["me"]["gold"] for obs in seq] for seq in records])
        loss = (heads["value"].squeeze(-1) - gold).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    print(f"trained 30 steps, value loss {loss.item():.4f}")
    model.save(old_ckpt)

    # 2. plan and apply
    plan = specsurgery("plan", old_ckpt, NEW_SPEC)
    print(plan.splitlines()[0])
    print(plan.splitlines()[-1])
    specsurgery("apply", old_ckpt, NEW_SPEC, "-o", new_ckpt)

    # 3. verify on random states
    print(specsurgery("verify", old_ckpt, new_ckpt, "--states", "1000").rstrip())

    # 4. one observation, both models (the new features' values cannot matter yet)
    old_model, new_model = ss.load(old_ckpt).eval(), ss.load(new_ckpt).eval()
    seq = [observation(random.Random(7), new_features=True) for _ in range(3)]
    old_seq = [{"me": o["me"], "units": [{k: u[k] for k in ("x", "y", "health", "mine", "kind")} for u in o["units"]]}
               for o in seq]
    with torch.no_grad():
        before, after = old_model(old_model.featurise([old_seq])), new_model(new_model.featurise([seq]))
    for head in before:
        print(f"{head:>7}: old {before[head][0, -1, :4].tolist()}\n         new {after[head][0, -1, :4].tolist()}")
    print(f"checkpoints in {out}")


if __name__ == "__main__":
    main()
