"""Keep training through surgery: an A2C agent on CartPole gains an observation
midway, and goes on learning with its weights and its Adam state carried over.

    python examples/cartpole_surgery.py --plot examples/cartpole_surgery.png   # the full run (the benchmark)
    python examples/cartpole_surgery.py --updates 4                           # a smoke run (CI runs run(updates=4))

The agent first sees three of CartPole's four observations: the cart's
position, the pole's angle and its angular velocity. Half way through the
budget, the spec gains the cart's velocity, in the middle of the `obs` group,
and `ss.surgery(agent, NEW_SPEC, optimizer=opt)` gives the new agent (it
computes what the old one did: the weights reading the new feature start at
zero) and its optimizer (Adam's moments moved with the weights). Training goes
on with both. Beside it, the same surgery with a fresh Adam, and the new spec
trained from scratch on the whole budget. Only the public API is used.

A2C: 8 environments stepped in turn, 16-step rollouts, GAE (gamma 0.99,
lambda 0.95), policy-gradient, value (0.5) and entropy (0.01) losses, Adam
(lr 2e-3), gradients clipped at 0.5. Seeds fix everything (one torch thread).
"""
from __future__ import annotations

import argparse
import copy
import time

import gymnasium as gym
import numpy as np
import torch

import specsurgery as ss

OLD_SPEC = """\
schema cart {
  group obs {
    x: float
    theta: float
    theta_dot: float
  }
}

model agent(o: cart) {
  h1 = tanh(linear(o.obs, 64))
  h2 = tanh(linear(h1, 64))
  out logits = linear(h2, 2)
  out value = linear(h2, 1)
}
"""
# the cart's velocity, added in the middle of the group
NEW_SPEC = OLD_SPEC.replace("    x: float\n", "    x: float\n    x_dot: float\n")
COLUMNS = {"x": 0, "x_dot": 1, "theta": 2, "theta_dot": 3}  # CartPole's observation vector

ENVS, ROLLOUT, GAMMA, LAMBDA, LR = 8, 16, 0.99, 0.95, 2e-3


class Rollouts:
    """ENVS CartPole environments stepped in turn; finished episodes' returns kept."""

    def __init__(self, seed: int):
        self.envs = [gym.make("CartPole-v1") for _ in range(ENVS)]
        self.obs = np.stack([env.reset(seed=seed + k)[0] for k, env in enumerate(self.envs)])
        self.running = np.zeros(ENVS)
        self.returns: list[float] = []
        self.steps = 0

    def inputs(self, agent, obs: np.ndarray) -> dict:
        """The observation columns the agent's spec has, in its order."""
        names = [f.removeprefix("obs.") for f in agent.features]
        return agent.inputs({"obs": obs[..., [COLUMNS[n] for n in names]]})

    def collect(self, agent, generator: torch.Generator):
        obs, actions, rewards, dones = [], [], [], []
        for _ in range(ROLLOUT):
            with torch.no_grad():
                logits = agent(self.inputs(agent, self.obs))["logits"]
            action = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator).squeeze(-1).numpy()
            obs.append(self.obs.copy())
            step_rewards, step_dones = np.zeros(ENVS), np.zeros(ENVS)
            for k, env in enumerate(self.envs):
                o, r, terminated, truncated, _ = env.step(int(action[k]))
                self.running[k] += r
                step_rewards[k], step_dones[k] = r, terminated
                if terminated or truncated:
                    self.returns.append(self.running[k])
                    self.running[k] = 0
                    o, _ = env.reset()
                    step_dones[k] = 1.0 if terminated else 0.0
                    if truncated and not terminated:  # time limit: bootstrap from the state reached
                        step_rewards[k] += GAMMA * self._value(agent, o)
                        step_dones[k] = 1.0
                self.obs[k] = o
            actions.append(action)
            rewards.append(step_rewards)
            dones.append(step_dones)
        self.steps += ROLLOUT * ENVS
        return np.stack(obs), np.stack(actions), np.stack(rewards), np.stack(dones)

    def _value(self, agent, o: np.ndarray) -> float:
        with torch.no_grad():
            return agent(self.inputs(agent, o[None]))["value"].item()


def update(agent, optimizer, rollouts: Rollouts, generator: torch.Generator) -> None:
    obs, actions, rewards, dones = rollouts.collect(agent, generator)
    T = obs.shape[0]
    out = agent(rollouts.inputs(agent, obs.reshape(T * ENVS, -1)))
    logits, values = out["logits"].reshape(T, ENVS, 2), out["value"].reshape(T, ENVS)
    with torch.no_grad():
        last = agent(rollouts.inputs(agent, rollouts.obs))["value"].reshape(ENVS)
        v = values.detach()
        advantages = torch.zeros(T, ENVS)
        gae = torch.zeros(ENVS)
        r, d = torch.as_tensor(rewards, dtype=torch.float32), torch.as_tensor(dones, dtype=torch.float32)
        for t in reversed(range(T)):
            following = last if t == T - 1 else v[t + 1]
            delta = r[t] + GAMMA * following * (1 - d[t]) - v[t]
            gae = delta + GAMMA * LAMBDA * (1 - d[t]) * gae
            advantages[t] = gae
        targets = advantages + v
    logp = torch.log_softmax(logits, -1)
    chosen = logp.gather(-1, torch.as_tensor(actions)[..., None]).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(-1).mean()
    loss = -(chosen * advantages).mean() + 0.5 * (targets - values).square().mean() - 0.01 * entropy
    optimizer.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(agent.parameters(), 0.5)
    optimizer.step()


def train(agent, optimizer, rollouts: Rollouts, updates: int, generator: torch.Generator, curve: list) -> None:
    """`updates` A2C updates; appends (env steps so far, mean return of the last 20 episodes)."""
    for _ in range(updates):
        update(agent, optimizer, rollouts, generator)
        if rollouts.returns:
            curve.append((rollouts.steps, float(np.mean(rollouts.returns[-20:]))))


def run(updates: int, seed: int = 0) -> dict:
    """The three runs, each `2 * updates` updates; returns their curves and what surgery did."""
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    agent = ss.compile(OLD_SPEC, seed=seed)
    optimizer = torch.optim.Adam(agent.parameters(), lr=LR)
    rollouts, generator = Rollouts(seed), torch.Generator().manual_seed(seed)
    before: list = []
    train(agent, optimizer, rollouts, updates, generator, before)

    # the spec changes: surgery in memory, weights and optimizer state together
    probe = rollouts.obs.copy()
    old_heads = agent(rollouts.inputs(agent, probe))
    result = ss.surgery(agent, NEW_SPEC, optimizer=optimizer)
    new_agent, new_optimizer = result.model, result.optimizer
    new_heads = new_agent(rollouts.inputs(new_agent, probe))
    preserved = max((old_heads[h] - new_heads[h]).abs().max().item() for h in old_heads)

    runs = {}
    fresh_agent = copy.deepcopy(new_agent)  # the carried optimizer holds new_agent's own parameters
    for label, model, opt in (("surgery, optimizer carried", new_agent, new_optimizer),
                              ("surgery, fresh Adam", fresh_agent, torch.optim.Adam(fresh_agent.parameters(), lr=LR))):
        fork = copy.deepcopy(rollouts)  # both continue from the same environments and the same random state
        fork_generator = torch.Generator().manual_seed(seed + 1)
        curve = list(before)
        train(model, opt, fork, updates, fork_generator, curve)
        runs[label] = curve

    scratch_agent = ss.compile(NEW_SPEC, seed=seed)
    scratch_rollouts, scratch_generator = Rollouts(seed), torch.Generator().manual_seed(seed)
    scratch: list = []
    train(scratch_agent, torch.optim.Adam(scratch_agent.parameters(), lr=LR), scratch_rollouts, 2 * updates,
          scratch_generator, scratch)
    runs["new spec from scratch"] = scratch
    return {"runs": runs, "change_at": rollouts.steps, "preserved": preserved, "plan": result.plan,
            "optimizer": type(new_optimizer).__name__}


def plot(path: str, result: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5), dpi=110)
    colors = {"surgery, optimizer carried": "tab:blue", "surgery, fresh Adam": "tab:purple",
              "new spec from scratch": "tab:orange"}
    for label, curve in result["runs"].items():
        ax.plot([s for s, _ in curve], [r for _, r in curve], color=colors[label], lw=1.4, label=label)
    ax.axvline(result["change_at"], color="black", lw=1.0)
    ax.text(result["change_at"], 0.98, "  spec gains x_dot (surgery)", transform=ax.get_xaxis_transform(),
            va="top", fontsize=9)
    ax.set_xlabel("environment steps")
    ax.set_ylabel("return (mean of the last 20 episodes)")
    ax.set_title("CartPole, A2C: an observation added midway, training goes on through surgery")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--updates", type=int, default=400, help="A2C updates before the change, and after (default 400)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", metavar="FILE.png")
    args = parser.parse_args(argv)
    t = time.perf_counter()
    result = run(args.updates, args.seed)
    s = result["plan"].summary
    print(f"surgery at {result['change_at']:,} environment steps: {s.transferred:,} of {s.old_params:,} weights "
          f"carried, {s.zeroed:,} zero, {s.fresh:,} fresh; largest change of any head on the current observations: "
          f"{result['preserved']:.2e}; optimizer carried: {result['optimizer']}")
    for label, curve in result["runs"].items():
        last = [r for _, r in curve[-20:]]
        print(f"  {label:<28} final return {np.mean(last) if last else float('nan'):7.1f}")
    if args.plot:
        plot(args.plot, result)
        print(f"plot written to {args.plot}")
    print(f"total time {time.perf_counter() - t:.1f} s")


if __name__ == "__main__":
    main()
