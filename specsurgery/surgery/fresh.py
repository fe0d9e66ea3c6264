"""Fresh values without torch, equal to the bit to what torch draws.

apply writes a new unit's weights from the op's init and a generator seeded
by (seed, parameter name) (apply.fresh_generator). Most inits are
`tensor.uniform_(low, high, generator=g)` on a float32 tensor, which torch's CPU
generator computes as: mt19937 seeded with the low 32 bits of the seed (the
reference init_genrand, which numpy's legacy seeding also is), one 32-bit draw
per element in the tensor's order, x = (draw & (2**24 - 1)) / 2**24 in float64,
then x * (high - low) + low (the bounds first rounded to float32), rounded to
float32. That is reproduced here with numpy's MT19937, so a change that only
moves bytes and draws uniform values never imports torch (~1-2 s a process).
`normal_` (nn.Embedding's init) has no such copy: torch computes it with its
own vectorised log/sin/cos. An init that asks for it, or for anything else,
raises NeedsTorch, and the caller draws the values with torch as before.
tests/test_apply_fresh.py holds both sides to the bit.
"""
from __future__ import annotations

from typing import Optional

import numpy as np


class NeedsTorch(Exception):
    """An init this module cannot reproduce to the bit."""


class RecordedInit:
    """What an op's init does to a tensor, recorded instead of done: the stand-in
    passed to `Op.init` for the tensor. One `uniform_` or one `fill_` is all
    that is understood; any other use of the tensor raises NeedsTorch."""

    def __init__(self):
        self.kind: Optional[str] = None
        self.args: tuple = ()

    def _record(self, kind: str, *args) -> "RecordedInit":
        if self.kind is not None:
            raise NeedsTorch("more than one call")
        self.kind, self.args = kind, args
        return self

    def uniform_(self, low=0.0, high=1.0, *, generator=None):
        if not isinstance(generator, Draws):
            raise NeedsTorch("uniform_ without this module's generator")
        return self._record("uniform", float(low), float(high), generator)

    def fill_(self, value):
        return self._record("fill", float(value))

    def __getattr__(self, name):
        raise NeedsTorch(name)


class Draws:
    """torch.Generator().manual_seed(seed) on the CPU: its stream of 32-bit draws."""

    def __init__(self, seed: int):
        key = np.random.RandomState(seed & 0xFFFFFFFF).get_state()  # init_genrand(seed mod 2**32)
        self._bits = np.random.MT19937()
        self._bits.state = {"bit_generator": "MT19937", "state": {"key": key[1], "pos": key[2]}}

    def raw(self, n: int) -> np.ndarray:
        return self._bits.random_raw(n)

    def skip(self, n: int) -> None:
        while n > 0:
            k = min(n, 1 << 22)
            self._bits.random_raw(k)
            n -= k


class FreshValues:
    """The values of one fresh region, handed out in order a chunk at a time
    (`take(n)`): what `init` does to a float32 tensor of the region's shape,
    converted to `dtype` (F32 or F64). Built by `recorded`."""

    def __init__(self, kind: str, args: tuple, dtype: str):
        self.kind, self.args = kind, args
        self.dtype = np.dtype("<f4") if dtype == "F32" else np.dtype("<f8")

    def take(self, n: int) -> np.ndarray:
        if self.kind == "fill":
            return np.full(n, np.float32(self.args[0]), dtype=np.float32).astype(self.dtype, copy=False)
        low, high, draws = self.args
        low, high = float(np.float32(low)), float(np.float32(high))
        if low == high:  # torch fills with `low` (a bound of -0.0 stays -0.0), drawing all the same
            draws.skip(n)
            return np.full(n, low, dtype=np.float32).astype(self.dtype, copy=False)
        x = (draws.raw(n) & np.uint64((1 << 24) - 1)).astype(np.float64)
        x *= 1.0 / (1 << 24)
        x *= high - low
        x += low
        return x.astype(np.float32).astype(self.dtype, copy=False)

    def skip(self, n: int) -> None:
        if self.kind == "uniform":
            self.args[2].skip(n)


def recorded(init, seed: int, dtype: str, sizes: list[int]) -> list[FreshValues]:
    """The values of a parameter's fresh regions of `sizes` elements, in the order
    its fills name them, each region from where the one before left the generator
    (as one torch generator would be used for them in turn). `init(tensor,
    generator)` is the op's init. NeedsTorch where this cannot be done to the bit."""
    if dtype not in ("F32", "F64"):
        raise NeedsTorch(dtype)  # float16 and bfloat16 roundings are left to torch
    out, drawn = [], 0
    for size in sizes:
        draws = Draws(seed)
        draws.skip(drawn)
        done = RecordedInit()
        init(done, draws)
        if done.kind is None:
            raise NeedsTorch("the init did nothing")
        out.append(FreshValues(done.kind, done.args, dtype))
        drawn += size if done.kind == "uniform" else 0
    return out
