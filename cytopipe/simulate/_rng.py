"""Independent, order-free random streams.

Every random quantity of the simulator comes from a generator keyed by (seed, role, ids...), so
patient 7's data do not depend on how many patients are simulated or in which order files are
written, and one file can be regenerated alone.
"""

from __future__ import annotations

import zlib

import numpy as np


def stream(seed: int, *key: int | str) -> np.random.Generator:
    """A numpy Generator for ``key`` under ``seed`` (strings are hashed with CRC-32)."""
    parts = tuple(zlib.crc32(k.encode("utf-8")) if isinstance(k, str) else int(k) for k in key)
    return np.random.default_rng(np.random.SeedSequence(entropy=int(seed), spawn_key=parts))
