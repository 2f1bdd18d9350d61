"""Deterministic per-user randomness: the same user lands on the same side of every split, on every machine."""

import hashlib

import numpy as np


def user_fraction(user_ids, seed: int) -> np.ndarray:
    """A number in [0, 1) per user from a keyed hash of (seed, user_id); Python's hash() is salted per process."""
    key = str(seed).encode()
    return np.fromiter(
        (
            int.from_bytes(hashlib.blake2b(str(u).encode(), digest_size=8, key=key).digest(), "big") / 2**64
            for u in user_ids
        ),
        dtype=np.float64,
        count=len(user_ids),
    )
