"""Statistics over seeds for the comparison report: what is a real difference and what is noise.

Everything here is scipy's; this module only decides which test applies and packs the results.

* :func:`summarize`: mean, std (n - 1), n and the 95% confidence interval of the mean
  (t distribution) of one metric over a configuration's seeds.
* :func:`compare`: a configuration against the reference on one metric. In attnlab the seed fixes
  the data order and the initialisation, so two configurations run on the same seeds are paired
  (``scipy.stats.ttest_rel`` on the per-seed differences); otherwise Welch's t-test
  (``scipy.stats.ttest_ind(equal_var=False)``). The difference (other - reference) comes with
  its 95% confidence interval. Fewer than two runs on either side: no test ("n too small").
* :func:`adjust`: Benjamini-Hochberg adjusted p-values (``scipy.stats.false_discovery_control``)
  over a family of comparisons; the verdict uses them when there are several.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
#: A difference whose (adjusted) p-value is at least this is reported as within noise.
ALPHA = 0.05

PAIRED = "paired t-test"
WELCH = "Welch's t-test"


def _finite(values: Sequence[Any]) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


def summarize(values: Sequence[float | None]) -> dict[str, Any]:
    """``{"mean", "std", "n", "ci95", "values"}`` of the finite values; std and the interval are
    ``None`` below two values (a single run says nothing about the spread)."""
    finite = _finite(values)
    n = len(finite)
    out: dict[str, Any] = {"mean": None, "std": None, "n": n, "ci95": None, "values": finite}
    if n == 0:
        return out
    data = np.asarray(finite, dtype=np.float64)
    out["mean"] = float(data.mean())
    if n >= 2:
        std = float(data.std(ddof=1))
        out["std"] = std
        if std == 0.0:  # scipy's interval is undefined (0 x inf) for a constant sample; it is the point
            out["ci95"] = [out["mean"], out["mean"]]
        else:
            low, high = stats.t.interval(CONFIDENCE, n - 1, loc=out["mean"], scale=stats.sem(data))
            out["ci95"] = [float(low), float(high)]
    return out


def compare(reference: Sequence[tuple[Any, float | None]], other: Sequence[tuple[Any, float | None]], *,
            higher_is_better: bool = False) -> dict[str, Any]:
    """``other`` against ``reference``, each a list of ``(seed, value)``; non-finite values are left out.

    Returns ``difference`` (mean of other - reference), ``ci95`` of that difference, ``test``,
    ``p_value``, ``n`` (``[n_other, n_reference]``; pairs for the paired test), ``paired_seeds`` and
    ``verdict``: ``"n too small"`` | ``"identical"`` | ``"within noise"`` | ``"better"`` | ``"worse"``
    judged on the raw p-value (:func:`adjust` re-judges a family on adjusted ones)."""
    ref_items = _items(reference)
    other_items = _items(other)
    n_other, n_ref = len(other_items), len(ref_items)
    out: dict[str, Any] = {"difference": None, "ci95": None, "test": None, "p_value": None, "p_adjusted": None,
                           "n": [n_other, n_ref], "paired_seeds": None, "higher_is_better": higher_is_better}
    if n_other and n_ref:
        out["difference"] = float(np.mean([v for _, v in other_items]) - np.mean([v for _, v in ref_items]))
    if n_other < 2 or n_ref < 2:
        out["verdict"] = "n too small"
        return out
    ref_seeds = [s for s, _ in ref_items]
    other_seeds = [s for s, _ in other_items]
    paired = (None not in ref_seeds and len(set(ref_seeds)) == n_ref and len(set(other_seeds)) == n_other
              and set(ref_seeds) == set(other_seeds))
    with warnings.catch_warnings():
        # constant or nearly identical samples (e.g. two mechanisms that are the same computation)
        warnings.simplefilter("ignore", RuntimeWarning)
        if paired:
            seeds = sorted(ref_seeds, key=str)
            ref_by_seed, other_by_seed = dict(ref_items), dict(other_items)
            result = stats.ttest_rel([other_by_seed[s] for s in seeds], [ref_by_seed[s] for s in seeds])
            out.update(test=PAIRED, paired_seeds=seeds)
        else:
            result = stats.ttest_ind([v for _, v in other_items], [v for _, v in ref_items], equal_var=False)
            out["test"] = WELCH
        interval = result.confidence_interval(CONFIDENCE)
    p_value = float(result.pvalue)
    low, high = float(interval.low), float(interval.high)
    out["ci95"] = [low, high] if math.isfinite(low) and math.isfinite(high) else None
    out["df"] = float(result.df)
    if math.isfinite(p_value):
        out["p_value"] = p_value
    out["verdict"] = verdict(out, p_value)
    return out


def _items(pairs: Sequence[tuple[Any, float | None]]) -> list[tuple[Any, float]]:
    return [(seed, float(v)) for seed, v in pairs if v is not None and math.isfinite(float(v))]


def verdict(comparison: dict[str, Any], p_value: float | None) -> str:
    """``identical`` (no difference and no spread, where scipy's p is undefined), ``within noise``
    (p >= :data:`ALPHA`) or ``better`` / ``worse`` by the sign of the difference."""
    if comparison["n"][0] < 2 or comparison["n"][1] < 2:
        return "n too small"
    if p_value is None or not math.isfinite(p_value):
        return "identical"
    if p_value >= ALPHA:
        return "within noise"
    lower = comparison["difference"] < 0
    return "better" if lower != comparison["higher_is_better"] else "worse"


def adjust(comparisons: list[dict[str, Any]]) -> str:
    """Benjamini-Hochberg adjusted p-values for a family of comparisons, in place.

    With two or more tested comparisons each gets ``p_adjusted`` and its verdict is judged on it;
    with one, the raw p-value stands. Returns which p-value the verdicts use: ``"adjusted"`` |
    ``"raw"``."""
    tested = [c for c in comparisons if c.get("p_value") is not None]
    if len(tested) < 2:
        return "raw"
    adjusted = stats.false_discovery_control([c["p_value"] for c in tested], method="bh")
    for comparison, p in zip(tested, adjusted):
        comparison["p_adjusted"] = float(p)
        comparison["verdict"] = verdict(comparison, float(p))
    return "adjusted"
