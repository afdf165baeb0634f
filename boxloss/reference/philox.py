"""Philox4x32-10 and the noise of the uncertainty kernels, in numpy.

A plain re-implementation of ``csrc/include/boxloss/common/philox.h`` and of
the counter layout of ``csrc/include/boxloss/uncertainty/math.h``, vectorised
over counters with uint64 arithmetic (a 32 x 32-bit product fits in 64 bits).
:func:`philox_normal` materialises the very noise the fused kernel draws, so
the reference losses can be compared with the kernel exactly.
"""

from __future__ import annotations

import numpy as np
import torch

MULTIPLIERS = (0xD2511F53, 0xCD9E8D57)
WEYL = (0x9E3779B9, 0xBB67AE85)
ROUNDS = 10
_MASK32 = np.uint64(0xFFFFFFFF)


def philox4x32_10(counter, key) -> np.ndarray:
    """Philox4x32-10 of ``counter`` (4, ...) uint32 under ``key`` (k0, k1).

    Returns the four output words, (4, ...) uint32.
    """
    x = [np.asarray(c, dtype=np.uint64) & _MASK32 for c in counter]
    k0, k1 = int(key[0]) & 0xFFFFFFFF, int(key[1]) & 0xFFFFFFFF
    m0, m1 = np.uint64(MULTIPLIERS[0]), np.uint64(MULTIPLIERS[1])
    for _ in range(ROUNDS):
        p0 = m0 * x[0]  # < 2^64: exact in uint64
        p1 = m1 * x[2]
        hi0, lo0 = p0 >> np.uint64(32), p0 & _MASK32
        hi1, lo1 = p1 >> np.uint64(32), p1 & _MASK32
        x = [hi1 ^ x[1] ^ np.uint64(k0), lo1, hi0 ^ x[3] ^ np.uint64(k1), lo0]
        k0 = (k0 + WEYL[0]) & 0xFFFFFFFF
        k1 = (k1 + WEYL[1]) & 0xFFFFFFFF
    return np.stack([w.astype(np.uint32) for w in x])


def _uniform_open(x: np.ndarray) -> np.ndarray:
    """(x + 1/2) 2^-32 in float64: exact, in (0, 1)."""
    return (x.astype(np.float64) + 0.5) * 2.0**-32


def _box_muller(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    r = np.sqrt(-2.0 * np.log(_uniform_open(a)))
    theta = 2.0 * np.pi * _uniform_open(b)
    return r * np.cos(theta), r * np.sin(theta)


def split_seed(seed: int, offset: int = 0) -> tuple[int, int, int]:
    """(k0, k1, offset) of a 64-bit seed (negative seeds are taken modulo 2^64)."""
    seed &= (1 << 64) - 1
    return seed & 0xFFFFFFFF, seed >> 32, offset


def philox_normal(
    seed: int,
    offset: int,
    samples: int,
    batch: int,
    classes: int,
    height: int,
    width: int,
    *,
    dtype=torch.float64,
    device="cpu",
) -> torch.Tensor:
    """The kernel's noise eps[t, b, c, h, w], shape (T, B, C, H, W).

    eps[t, b, c, h, w] is normal number c mod 4 of the Philox4x32-10 block with
    key (seed mod 2^32, seed >> 32) and counter (c // 4, t, pixel mod 2^32,
    (pixel >> 32) + offset), pixel = (b H + h) W + w; the block's words
    (x0, x1, x2, x3) give r(x0) cos(2 pi u(x1)), r(x0) sin(2 pi u(x1)),
    r(x2) cos(2 pi u(x3)), r(x2) sin(2 pi u(x3)) with r(x) = sqrt(-2 ln u(x))
    and u(x) = (x + 1/2) 2^-32.  Computed in float64, then cast to ``dtype``.
    """
    k0, k1, offset = split_seed(int(seed), int(offset))
    blocks = (classes + 3) // 4
    pixels = batch * height * width
    t = np.arange(samples, dtype=np.uint64).reshape(samples, 1, 1)
    k = np.arange(blocks, dtype=np.uint64).reshape(1, blocks, 1)
    pixel = np.arange(pixels, dtype=np.uint64).reshape(1, 1, pixels)
    shape = (samples, blocks, pixels)
    counter = [
        np.broadcast_to(k, shape),
        np.broadcast_to(t, shape),
        np.broadcast_to(pixel & _MASK32, shape),
        np.broadcast_to(((pixel >> np.uint64(32)) + np.uint64(offset)) & _MASK32, shape),
    ]
    x = philox4x32_10(counter, (k0, k1))
    z0, z1 = _box_muller(x[0], x[1])
    z2, z3 = _box_muller(x[2], x[3])
    z = np.stack([z0, z1, z2, z3], axis=2)  # (T, blocks, 4, pixels)
    z = z.reshape(samples, blocks * 4, batch, height, width)[:, :classes]
    return torch.from_numpy(np.ascontiguousarray(z.transpose(0, 2, 1, 3, 4))).to(device=device, dtype=dtype)
