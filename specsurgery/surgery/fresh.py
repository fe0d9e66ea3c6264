"""Fresh values without torch, equal to the bit to what torch draws.

apply writes a new unit's weights from the op's init and a generator seeded
by (seed, parameter name) (apply.fresh_generator). Most inits are
`tensor.uniform_(low, high, generator=g)` on a float32 tensor, which torch's CPU
generator computes as: mt19937 seeded with the low 32 bits of the seed (the
reference init_genrand, which numpy's legacy seeding also is), one 32-bit draw
per element in the tensor's order, x = (draw & (2**24 - 1)) / 2**24 in float64,
then x * (high - low) + low (the bounds first rounded to float32), rounded to
float32. That is reproduced here: the draws by Python's own mt19937 (`random`,
in C), set to init_genrand's state; the arithmetic in numpy for a large
region, in plain Python for a small one while numpy is not yet imported
(its import costs a one-file apply a fifth of a second; the two give the same
bits). So a change that only moves bytes and draws uniform values never
imports torch (~1-2 s a process), and one that draws a few never imports numpy.
`normal_` (nn.Embedding's init) has no such copy: torch computes it with its
own vectorised log/sin/cos. An init that asks for it, or for anything else,
raises NeedsTorch, and the caller draws the values with torch as before.
tests/test_apply_fresh.py holds both sides to the bit.
"""
from __future__ import annotations

import random
import struct
import sys
from typing import Optional

_LOW_24 = (1 << 24) - 1
PLAIN_PYTHON_MAX = 1 << 16  # values at most this many are computed without numpy, if it is not imported


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


def _init_genrand(seed: int) -> tuple[int, ...]:
    """mt19937's 624 words after the reference init_genrand(seed mod 2**32)."""
    state = [seed & 0xFFFFFFFF]
    for i in range(1, 624):
        prev = state[-1]
        state.append((1812433253 * (prev ^ (prev >> 30)) + i) & 0xFFFFFFFF)
    return tuple(state)


class Draws:
    """torch.Generator().manual_seed(seed) on the CPU: its stream of 32-bit draws."""

    def __init__(self, seed: int):
        self._mt = random.Random()
        self._mt.setstate((3, _init_genrand(seed) + (624,), None))  # 624: the next draw twists first

    def raw_bytes(self, n: int) -> bytes:
        """The next n draws, as little-endian 32-bit words (getrandbits fills an
        int from its lowest word up, one draw a word)."""
        return self._mt.getrandbits(32 * n).to_bytes(4 * n, "little") if n else b""

    def raw(self, n: int):
        import numpy as np

        return np.frombuffer(self.raw_bytes(n), dtype="<u4")

    def skip(self, n: int) -> None:
        while n > 0:
            k = min(n, 1 << 22)
            self._mt.getrandbits(32 * k)
            n -= k


def _numpy_at_hand(n: int) -> bool:
    """Whether n values are best computed by numpy: many, or numpy imported already."""
    return n > PLAIN_PYTHON_MAX or "numpy" in sys.modules


def _float32(x: float) -> float:
    return struct.unpack("<f", struct.pack("<f", x))[0]


class FreshValues:
    """The values of one fresh region, handed out in order a chunk at a time
    (`take(n)`): what `init` does to a float32 tensor of the region's shape,
    converted to `dtype` (F32 or F64). Built by `recorded`."""

    def __init__(self, kind: str, args: tuple, dtype: str):
        self.kind, self.args, self.file_dtype = kind, args, dtype

    @property
    def dtype(self):
        import numpy as np

        return np.dtype("<f4") if self.file_dtype == "F32" else np.dtype("<f8")

    def take_bytes(self, n: int) -> bytes:
        """take(n) as the file's bytes; in plain Python where n is small and
        numpy not imported (the same bits: each step is the same float64
        operation, and struct rounds to float32 as numpy's cast does)."""
        if _numpy_at_hand(n):
            return self.take(n).tobytes()
        if self.kind == "fill":
            values = [_float32(self.args[0])] * n
        else:
            low, high, draws = self.args
            low, high = _float32(low), _float32(high)
            if low == high:
                draws.skip(n)
                values = [low] * n
            else:
                scale, width = 1.0 / (1 << 24), high - low
                values = [(w & _LOW_24) * scale * width + low for w in struct.unpack(f"<{n}I", draws.raw_bytes(n))]
        as_float32 = struct.pack(f"<{n}f", *values)
        if self.file_dtype == "F32":
            return as_float32
        return struct.pack(f"<{n}d", *struct.unpack(f"<{n}f", as_float32))

    def take(self, n: int):
        import numpy as np

        if self.kind == "fill":
            return np.full(n, np.float32(self.args[0]), dtype=np.float32).astype(self.dtype, copy=False)
        low, high, draws = self.args
        low, high = float(np.float32(low)), float(np.float32(high))
        if low == high:  # torch fills with `low` (a bound of -0.0 stays -0.0), drawing all the same
            draws.skip(n)
            return np.full(n, low, dtype=np.float32).astype(self.dtype, copy=False)
        x = (draws.raw(n) & np.uint32(_LOW_24)).astype(np.float64)
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
