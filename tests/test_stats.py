"""Statistics over seeds against scipy called directly and against the closed forms."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from attnlab import stats


def test_summary_matches_closed_form_and_scipy():
    values = [3.1, 3.2, 2.95, 3.05]
    summary = stats.summarize(values)
    n, mean, std = 4, float(np.mean(values)), float(np.std(values, ddof=1))
    assert summary["n"] == n and summary["mean"] == pytest.approx(mean) and summary["std"] == pytest.approx(std)
    # closed form: mean ± t_{0.975, n-1} s / sqrt(n), and scipy's one-sample t-test interval
    half = sps.t.ppf(0.975, n - 1) * std / math.sqrt(n)
    assert summary["ci95"] == pytest.approx([mean - half, mean + half])
    interval = sps.ttest_1samp(values, 0.0).confidence_interval(0.95)
    assert summary["ci95"] == pytest.approx([interval.low, interval.high])


def test_summary_drops_missing_values_and_gives_no_spread_for_one_run():
    assert stats.summarize([3.0, None, float("nan")]) == {"mean": 3.0, "std": None, "n": 1, "ci95": None,
                                                          "values": [3.0]}
    assert stats.summarize([])["n"] == 0 and stats.summarize([])["mean"] is None
    assert stats.summarize([2.0, 2.0])["ci95"] == [2.0, 2.0]  # no spread: the interval is the point


def test_welch_when_seeds_differ():
    reference = [(0, 3.00), (1, 3.05), (2, 2.98)]
    other = [(3, 3.10), (4, 3.20), (5, 3.12), (6, 3.15)]
    c = stats.compare(reference, other)
    a, b = [v for _, v in reference], [v for _, v in other]
    expected = sps.ttest_ind(b, a, equal_var=False)
    assert c["test"] == stats.WELCH and c["paired_seeds"] is None and c["n"] == [4, 3]
    assert c["p_value"] == pytest.approx(expected.pvalue)
    assert c["difference"] == pytest.approx(np.mean(b) - np.mean(a))
    # the Welch-Satterthwaite interval written out
    va, vb = np.var(a, ddof=1) / 3, np.var(b, ddof=1) / 4
    df = (va + vb) ** 2 / (va**2 / 2 + vb**2 / 3)
    half = sps.t.ppf(0.975, df) * math.sqrt(va + vb)
    assert c["ci95"] == pytest.approx([c["difference"] - half, c["difference"] + half])
    assert c["verdict"] == ("worse" if expected.pvalue < 0.05 else "within noise")


def test_paired_when_the_same_seeds_ran():
    """The seed fixes data order and init: a small shift that is consistent per seed is real, though
    the seeds' spread hides it from an unpaired test."""
    reference = [(0, 3.00), (1, 3.20), (2, 3.40), (3, 3.10)]
    other = [(3, 3.112), (1, 3.21), (0, 3.011), (2, 3.409)]  # order does not matter, seeds do
    c = stats.compare(reference, other)
    by_seed = dict(other)
    diffs = [by_seed[s] - v for s, v in sorted(reference)]
    assert c["test"] == stats.PAIRED and c["paired_seeds"] == [0, 1, 2, 3]
    assert c["p_value"] == pytest.approx(sps.ttest_rel([by_seed[s] for s, _ in sorted(reference)],
                                                        [v for _, v in sorted(reference)]).pvalue)
    half = sps.t.ppf(0.975, 3) * np.std(diffs, ddof=1) / 2
    assert c["ci95"] == pytest.approx([np.mean(diffs) - half, np.mean(diffs) + half])
    assert c["verdict"] == "worse" and c["p_value"] < 0.01
    unpaired = sps.ttest_ind([v for _, v in other], [v for _, v in reference], equal_var=False)
    assert unpaired.pvalue > 0.5


def test_n_too_small_gives_no_p_value():
    for reference, other in (([(0, 3.0)], [(0, 3.1), (1, 3.2)]), ([(0, 3.0), (1, 3.1)], [(0, 3.5), (1, None)])):
        c = stats.compare(reference, other)
        assert c["verdict"] == "n too small" and c["p_value"] is None and c["ci95"] is None and c["test"] is None


def test_identical_runs_are_identical_not_a_nan():
    same = [(0, 3.0), (1, 3.1), (2, 2.9)]
    c = stats.compare(same, list(same))
    assert c["verdict"] == "identical" and c["p_value"] is None and c["difference"] == 0.0


def test_accuracy_higher_is_better():
    reference = [(0, 0.50), (1, 0.52), (2, 0.51)]
    other = [(0, 0.80), (1, 0.83), (2, 0.81)]
    assert stats.compare(reference, other, higher_is_better=True)["verdict"] == "better"
    assert stats.compare(reference, other)["verdict"] == "worse"


def test_benjamini_hochberg_adjusts_a_family_and_rejudges_it():
    reference = [(0, 3.00), (1, 3.05), (2, 2.98)]
    family = [stats.compare(reference, [(0, 3.30), (1, 3.36), (2, 3.27)]),  # clearly real
              stats.compare(reference, [(0, 3.03), (1, 3.07), (2, 3.02)]),  # p = 0.035 alone
              stats.compare(reference, [(0, 3.01), (1, 3.02), (2, 3.00)])]
    raw = [c["p_value"] for c in family]
    assert family[1]["verdict"] == "worse" and 0.025 < raw[1] < 0.05
    assert stats.adjust(family) == "adjusted"
    expected = sps.false_discovery_control(raw, method="bh")
    assert [c["p_adjusted"] for c in family] == pytest.approx(list(expected))
    for c, p in zip(family, expected):
        assert c["verdict"] == ("worse" if p < stats.ALPHA else "within noise")
    assert family[0]["verdict"] == "worse" and family[1]["verdict"] == "within noise"  # 3/2 x 0.035 > 0.05
    # one comparison: the raw p-value stands; untested comparisons are left alone
    single = [stats.compare(reference, [(0, 3.30), (1, 3.36), (2, 3.27)]), stats.compare(reference, [(0, 3.3)])]
    assert stats.adjust(single) == "raw" and single[0]["p_adjusted"] is None and single[1]["verdict"] == "n too small"
