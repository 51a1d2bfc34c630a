"""Runs that share a configuration id (they differ only in seed, or in where and how they ran)
summarised together, and which differences between configurations are larger than the noise
between seeds. Statistics come from scipy."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
SIGNIFICANCE = 0.05  # the p-value under which a difference is called larger than the noise
TEST = "Welch's t-test (scipy.stats.ttest_ind, equal_var=False)"


@dataclass(frozen=True)
class Spread:
    """n values (accuracies of one configuration's seeds): mean, sample std, range and the
    confidence interval of the mean (Student's t; undefined, NaN, for n = 1)."""

    values: tuple[float, ...]
    mean: float
    std: float
    low: float
    high: float
    ci: tuple[float, float]

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        x = np.asarray(values, dtype=float)
        n, mean = len(x), float(x.mean())
        if n < 2:
            return cls(tuple(x), mean, math.nan, mean, mean, (math.nan, math.nan))
        sem = float(stats.sem(x))
        # scipy answers NaN for a zero scale; equal values leave no doubt about their mean
        low, high = stats.t.interval(CONFIDENCE, df=n - 1, loc=mean, scale=sem) if sem else (
            mean, mean)  # fmt: skip
        return cls(tuple(x), mean, float(x.std(ddof=1)), float(x.min()), float(x.max()),
                   (float(low), float(high)))  # fmt: skip

    @property
    def n(self) -> int:
        return len(self.values)


@dataclass(frozen=True)
class Difference:
    """Configuration `a` against `b` on one metric: the difference of means and Welch's
    t-test's p-value (NaN when either has fewer than two runs)."""

    a: str
    b: str
    delta: float
    p_value: float

    @property
    def significant(self) -> bool | None:
        return None if math.isnan(self.p_value) else self.p_value < SIGNIFICANCE


def differences(spreads: dict[str, Spread]) -> list[Difference]:
    """Every pair of configurations, in the given order."""
    pairs = []
    for (a, x), (b, y) in itertools.combinations(spreads.items(), 2):
        p = math.nan
        if x.n >= 2 and y.n >= 2:
            p = float(stats.ttest_ind(x.values, y.values, equal_var=False).pvalue)
        pairs.append(Difference(a, b, x.mean - y.mean, p))
    return pairs
