"""Deterministic per-user randomness: the same user lands on the same side of every split, on every machine."""

import hashlib

import numpy as np
import pandas as pd

# The training split: 20% of the users (by the keyed hash below, seed SPLIT_SEED) are held out for validation and
# calibration. The training cohort is sampled with the same rule, so the users it keeps are the ones training keeps.
VALIDATION_FRACTION = 0.2
SPLIT_SEED = 0
# The spec's default `max_training_users`: training sample cap (docs/predictions.md has the learning curve behind it).
MAX_TRAINING_USERS = 250_000


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


def split_users(
    user_ids: pd.Series, *, validation_fraction: float, max_training_users: int, seed: int, snapshots: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Boolean row masks ``(train, validation)``; rows of users beyond the cap are in neither.

    Each user draws one stable fraction u from (seed, user_id) (splits.user_fraction): u < validation_fraction puts
    it in validation. The cap keeps the users whose u is lowest *within their side* (u rescaled to [0, 1) on each
    side), so it takes both sides in proportion and never moves a user across the split. All rows of a user land on
    one side, and a user keeps its side from one retrain to the next.

    ``snapshots`` (a stacked matrix's snapshot per row): the cap applies to each snapshot's users on their own, as
    the cohort asset samples each snapshot, so a matrix built from those samples is kept whole.
    """
    if snapshots is not None:
        train, validation = np.zeros(len(user_ids), bool), np.zeros(len(user_ids), bool)
        for snapshot in np.unique(snapshots):
            rows = np.flatnonzero(snapshots == snapshot)
            train[rows], validation[rows] = split_users(
                user_ids.iloc[rows], validation_fraction=validation_fraction, max_training_users=max_training_users, seed=seed
            )
        return train, validation
    if not 0 < validation_fraction < 1:
        raise ValueError(f"validation_fraction must be between 0 and 1, got {validation_fraction}")
    codes, uniques = pd.factorize(user_ids)
    if (codes < 0).any():
        raise ValueError("user_id has missing values")
    fraction = user_fraction(uniques, seed)
    in_validation = fraction < validation_fraction
    kept = np.ones(len(uniques), dtype=bool)
    if len(uniques) > max_training_users:
        rank_in_side = np.where(
            in_validation, fraction / validation_fraction, (fraction - validation_fraction) / (1 - validation_fraction)
        )
        kept = rank_in_side <= np.partition(rank_in_side, max_training_users - 1)[max_training_users - 1]
    return (kept & ~in_validation)[codes], (kept & in_validation)[codes]
