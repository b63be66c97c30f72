"""Deterministic train/val/test splits and atom-budgeted mini-batches.

Splits are reproducible from a seed so that a reported test error can always be recomputed
on exactly the same frames. Batches are bounded by the number of atoms, not frames, because
memory and time of a message-passing model scale with atoms (and edges), and molecules in
one data set range from 2 to hundreds of atoms.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from .frames import Frame


def _targets(total: int, fractions: Sequence[float]) -> list[int]:
    """Split ``total`` items into integer counts proportional to ``fractions``.

    Largest-remainder rounding: counts always add up to ``total`` and no item is lost.
    """
    raw = np.asarray(fractions, dtype=np.float64) * total
    counts = np.floor(raw).astype(int)
    remainder = total - int(counts.sum())
    # Ties go to the earlier split (train first), which is the conventional preference.
    order = sorted(range(len(raw)), key=lambda i: (-(raw[i] - counts[i]), i))
    for i in order[:remainder]:
        counts[i] += 1
    return counts.tolist()


def _check_fractions(fractions: Sequence[float]) -> list[float]:
    fractions = [float(f) for f in fractions]
    if not fractions or any(not np.isfinite(f) or f < 0 for f in fractions):
        raise ValueError(f"fractions must be non-negative numbers, got {fractions}")
    if abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"fractions must sum to 1, got {fractions} (sum {sum(fractions):g})")
    return fractions


def split_frames(
    frames: Sequence[Frame],
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    group_by_source: bool = False,
) -> list[list[Frame]]:
    """Partition ``frames`` into ``len(fractions)`` disjoint lists, deterministically in ``seed``.

    By default frames are shuffled individually. With ``group_by_source=True`` all frames that
    share a ``source`` label go to the same split: consecutive MD snapshots of one trajectory
    are strongly correlated, and spreading them over train and test would make the test error
    look better than it is. Group sizes then make the fractions approximate.
    """
    fractions = _check_fractions(fractions)
    frames = list(frames)
    rng = np.random.default_rng(seed)

    if not group_by_source:
        order = rng.permutation(len(frames))
        splits, start = [], 0
        for count in _targets(len(frames), fractions):
            splits.append([frames[i] for i in order[start : start + count]])
            start += count
        return splits

    groups: dict[str, list[int]] = {}
    for i, frame in enumerate(frames):
        groups.setdefault(frame.source, []).append(i)
    keys = sorted(groups)  # sorted first so the result does not depend on input order of groups
    keys = [keys[i] for i in rng.permutation(len(keys))]
    targets = _targets(len(frames), fractions)
    splits_idx: list[list[int]] = [[] for _ in fractions]
    for key in keys:
        # Give the whole group to the split that is furthest below its target (relative to
        # its target, so small val/test splits are filled too); ties go to the earlier split.
        deficits = [
            (targets[s] - len(splits_idx[s])) / max(targets[s], 1) if targets[s] else -np.inf
            for s in range(len(fractions))
        ]
        splits_idx[int(np.argmax(deficits))].extend(groups[key])
    return [[frames[i] for i in idx] for idx in splits_idx]


def batches_by_atoms(
    frames: Sequence[Frame],
    max_atoms: int,
    shuffle: bool = False,
    seed: int = 0,
) -> Iterator[list[Frame]]:
    """Yield consecutive batches whose total atom count is at most ``max_atoms``.

    Greedy next-fit packing in (optionally shuffled) order: a frame that no longer fits closes
    the current batch. A frame larger than ``max_atoms`` on its own is yielded as a batch of
    one rather than dropped, so every frame is seen exactly once per pass.
    """
    if int(max_atoms) < 1:
        raise ValueError(f"max_atoms must be >= 1, got {max_atoms}")
    frames = list(frames)
    order = np.random.default_rng(seed).permutation(len(frames)) if shuffle else range(len(frames))
    batch: list[Frame] = []
    n_atoms = 0
    for i in order:
        frame = frames[i]
        size = len(frame)
        if batch and n_atoms + size > max_atoms:
            yield batch
            batch, n_atoms = [], 0
        batch.append(frame)
        n_atoms += size
    if batch:
        yield batch
