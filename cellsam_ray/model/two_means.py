"""sklearn's ``KMeans(n_clusters=2, n_init=1, random_state=42)`` on 1-D scores, in closed form and checked.

The published box threshold clusters a tile's ~3,500 detector scores with sklearn (k-means++ start,
Lloyd). sklearn spends ~25 ms on it per tile; on sorted scores with prefix sums the same steps take well
under a millisecond. This module replays sklearn's algorithm decision for decision in float64:

1. k-means++: sklearn's own draws from ``RandomState(42)`` (one ``choice``, two ``uniform`` trials), the
   candidate picked by ``searchsorted`` over the cumulative squared distances in data order, the
   candidate that lowers the potential most kept;
2. Lloyd: in 1-D the labels are a split of the sorted scores at the midpoint of the two centres, and
   each centre is a mean read off prefix sums; stop on unchanged labels, or when the squared centre
   shift is within ``1e-4 ×`` the scores' variance (then the centres of that step are returned).

sklearn works in float32 (and its multi-threaded sums are not even bit-reproducible), so every discrete
decision is taken here only when float32 rounding could not have gone the other way: a k-means++ draw
too close to a boundary is replayed from both neighbouring candidates (both must give the same
answer), and any other near-tie (a score at a midpoint, a shift at the tolerance, empty or coinciding
clusters) makes :func:`two_means_centres` return ``None``, so the caller asks sklearn itself.
"""

from __future__ import annotations

import numpy as np

SEED = 42
"""The published ``random_state``."""
LOCAL_TRIALS = 2
"""sklearn's k-means++ trials per centre for two clusters: ``2 + int(log(2))``."""
TOL = 1e-4
"""sklearn's default ``tol``, relative to the data's variance."""
MAX_ITER = 300
"""sklearn's default ``max_iter``."""
DRAW_MARGIN = 1e-4
"""A k-means++ draw this close (relative to the potential) to a cumulative-sum boundary may fall on
either side in float32: sklearn's cumulative sum is sequential float32 over ~3,500 terms."""
VALUE_MARGIN = 1e-5
"""Scores within this of a midpoint (or of the final threshold) count as ties: centres are float32 means."""


def two_means_centres(scores: np.ndarray, *, strict: bool = True) -> np.ndarray | None:
    """The two cluster centres sklearn's KMeans finds for ``scores`` (n >= 2, float32, data order),
    or None where rounding could change its answer (ties, degenerate clusters). With ``strict`` off,
    near-ties are taken as float64 decides them (for a machine without sklearn); None only where
    sklearn would relocate an empty cluster."""
    margins = (DRAW_MARGIN, VALUE_MARGIN) if strict else (0.0, 0.0)
    values = np.asarray(scores, dtype=np.float32).reshape(-1)
    if np.all(values == values[0]):
        return np.array([values[0], values[0]], dtype=np.float64)  # sklearn: one distinct cluster, twice
    x = values.astype(np.float64)
    mean = x.mean()
    x = x - mean  # sklearn centres the data first; only rounding depends on it
    order = np.argsort(x, kind="stable")
    ordered = x[order]
    prefix = np.concatenate(([0.0], np.cumsum(ordered)))
    tol = float(np.var(values)) * TOL
    answers = set()
    for init in _kmeans_plusplus(x, margins[0]):
        if init is None:
            return None
        centres = _lloyd(ordered, prefix, init, tol, margins[1])
        if centres is None:
            return None
        answers.add(tuple(np.round(centres + mean, 12)))
    if len(answers) != 1:  # the two readings of an ambiguous draw disagree
        return None
    return np.array(answers.pop())


def _kmeans_plusplus(x: np.ndarray, margin: float) -> list[tuple[float, float] | None]:
    """Initial centres as sklearn's ``_kmeans_plusplus`` picks them: one reading, or two for a draw that
    float32 rounding could put on either side of a boundary; None for a near-tie between candidates."""
    n = len(x)
    random = np.random.RandomState(SEED)
    weights = np.ones(n, dtype=np.float32)
    first = random.choice(n, p=weights / weights.sum())  # sklearn's own call, so its own draw
    closest = (x - x[first]) ** 2
    potential = closest.sum()
    draws = random.uniform(size=LOCAL_TRIALS) * potential
    cumulative = np.cumsum(closest)
    readings: list[list[int]] = []
    for draw in draws:
        index = min(int(np.searchsorted(cumulative, draw)), n - 1)
        options = {index}
        if index > 0 and draw - cumulative[index - 1] < margin * potential:
            options.add(index - 1)
        if cumulative[index] - draw < margin * potential and index + 1 < n:
            options.add(index + 1)
        readings.append(sorted(options))
    inits: list[tuple[float, float] | None] = []
    for a in readings[0]:
        for b in readings[1]:
            pots = [np.minimum(closest, (x - x[c]) ** 2).sum() for c in (a, b)]
            if x[a] != x[b] and abs(pots[0] - pots[1]) < margin * potential:
                inits.append(None)  # the two candidates lower the potential equally: argmin is a coin toss
                continue
            second = (a, b)[int(np.argmin(pots))]
            inits.append((x[first], x[second]))
    return list(dict.fromkeys(inits))


def _lloyd(ordered: np.ndarray, prefix: np.ndarray, init: tuple[float, float], tol: float,
           margin: float) -> np.ndarray | None:
    """sklearn's ``_kmeans_single_lloyd`` on sorted 1-D data. A score at a midpoint (within rounding) is
    followed both ways; None unless every way ends in the same centres, or at any other near-tie."""
    ends = _paths(ordered, prefix, np.array(init, dtype=np.float64), None, tol, MAX_ITER, [BRANCHES], margin)
    if ends is None or len({tuple(c) for c in ends}) != 1:
        return None
    return ends[0]


BRANCHES = 16
"""Most extra Lloyd paths followed through near-ties before the replay gives up and sklearn answers."""


def _paths(ordered, prefix, centres, previous_split, tol, steps, budget, margin) -> list[np.ndarray] | None:
    """The final centres of every path Lloyd can take from ``centres`` in ``steps`` iterations."""
    n = len(ordered)
    while steps > 0:
        if centres[0] == centres[1]:
            return None  # every point ties: sklearn relocates an empty cluster
        midpoint = (centres[0] + centres[1]) / 2
        # The points nearer the lower centre form its cluster; a point at the midpoint joins cluster 0.
        split = int(np.searchsorted(ordered, midpoint, side="right" if centres[0] < centres[1] else "left"))
        splits = [split]
        if split > 0 and midpoint - ordered[split - 1] < margin:
            splits.append(split - 1)
        if split < n and ordered[split] - midpoint < margin:
            splits.append(split + 1)
        if len(splits) > 1:
            budget[0] -= len(splits) - 1
            if budget[0] < 0:
                return None
            ends: list[np.ndarray] = []
            for choice in splits:
                outcome = _update(ordered, prefix, centres, choice, previous_split, tol, margin)
                if outcome is None:
                    return None
                new, done = outcome
                more = [new] if done or steps == 1 else _paths(
                    ordered, prefix, new, choice, tol, steps - 1, budget, margin)
                if more is None:
                    return None
                ends += more
            return ends
        outcome = _update(ordered, prefix, centres, split, previous_split, tol, margin)
        if outcome is None:
            return None
        centres, done = outcome
        if done:
            return [centres]
        previous_split, steps = split, steps - 1
    return [centres]


def _update(ordered, prefix, centres, split, previous_split, tol, margin) -> tuple[np.ndarray, bool] | None:
    """The centres of the clusters ``split`` makes, and whether sklearn stops there (labels unchanged, or
    the squared shift within ``tol``); None for an empty cluster or a shift at the tolerance."""
    n = len(ordered)
    if split in (0, n):
        return None  # an empty cluster: sklearn relocates it
    low = 0 if centres[0] < centres[1] else 1
    new = np.empty(2)
    new[low] = prefix[split] / split
    new[1 - low] = (prefix[n] - prefix[split]) / (n - split)
    shift = float(((new - centres) ** 2).sum())
    if split == previous_split:
        return new, True
    if margin and abs(shift - tol) < 1e-3 * tol:
        return None
    return new, shift <= tol
