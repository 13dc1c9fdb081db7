"""Statistics of the study report against independent references (scipy, brute force), and the
report's edge cases: rounding, non-positive values under a log ratio, runs that diverged."""
import itertools
import math

import numpy as np
import pytest
from scipy import stats

from sharpkit.study.report import _verdict, paired_test, spearman, summarize


@pytest.mark.parametrize("lb_greater", [True, False])
@pytest.mark.parametrize("log", [False, True])
def test_paired_test_is_scipys_one_sided_ttest_rel(lb_greater, log):
    rng = np.random.default_rng(3)
    for n in (2, 3, 5, 7):
        sb = rng.lognormal(0, 1, n)
        lb = sb * rng.lognormal(0.4, 1, n)
        r = paired_test(sb, lb, lb_greater=lb_greater, log=log)
        a, b = (np.log(lb), np.log(sb)) if log else (lb, sb)
        ref = stats.ttest_rel(a, b, alternative="greater" if lb_greater else "less")
        assert r["n"] == n and r["t"] == pytest.approx(ref.statistic) and r["p"] == pytest.approx(ref.pvalue)
        if log:
            assert r["ratio_geomean"] == pytest.approx(stats.gmean(lb / sb))


def test_spearman_matches_brute_force_permutations_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(15):
        n = int(rng.integers(3, 7))
        x, y = rng.integers(0, 3, n).astype(float), rng.integers(0, 3, n).astype(float)
        if len(set(x)) < 2 or len(set(y)) < 2:
            continue
        rho = stats.spearmanr(x, y).statistic
        perms = [stats.spearmanr(x, y[list(p)]).statistic for p in itertools.permutations(range(n))]
        r = spearman(x, y)
        assert r.rho == pytest.approx(rho) and r.p == pytest.approx(np.mean(np.abs(perms) >= abs(rho) - 1e-12))


def test_equal_differences_up_to_rounding_are_equal_differences():
    # Every seed 3.3x sharper at LB, or 0.2 points apart: the differences are equal but for the last
    # bit, which gave t ~ 1e16, p ~ 1e-33 and "reproduced", where exactly equal differences give
    # the sign test's p = 1/8 and "same direction, not significant".
    exact = paired_test([1.0, 1.0, 1.0], [2.0, 2.0, 2.0])
    sb = [0.7, 1.3, 2.9]
    for r in (paired_test(sb, [3.3 * v for v in sb], log=True), paired_test([0.1, 0.7, 1.3], [0.3, 0.9, 1.5])):
        assert r["test"] == exact["test"] and r["p"] == exact["p"] and r["verdict"] == exact["verdict"]
        assert math.isnan(r["t"])
    # A small but real spread is still a t-test.
    r = paired_test([1.0, 1.0, 1.0], [2.0, 2.0 + 1e-6, 2.0 - 2e-6])
    assert r["test"] == "paired t-test" and r["verdict"] == "reproduced"


def test_log_ratio_test_keeps_seeds_with_zero_or_negative_values():
    # An SB minimizer of sharpness 0 (the ascent found no higher loss) or a negative Hutch++ trace
    # has no log ratio: the seed was dropped from the test (n = 3 of 4) while the table's mean kept
    # it.  Every seed is kept, the test is on plain differences, and there is no geometric ratio.
    sb, lb = [0.0, 1.0, 1.2, 0.9], [5.0, 3.0, 4.0, 2.5]
    r = paired_test(sb, lb, lb_greater=True, log=True)
    ref = stats.ttest_rel(lb, sb, alternative="greater")
    assert r["n"] == 4 and r["t"] == pytest.approx(ref.statistic) and r["p"] == pytest.approx(ref.pvalue)
    assert math.isnan(r["ratio_geomean"]) and r["scale"] == "difference"
    stat = _verdict("claim", "", "", r)["statistic"]
    assert "paired over 4 seeds" in stat and "≤ 0" in stat
    # All positive: log ratios as before.
    assert paired_test([1.0, 1.1, 0.9], [3.0, 2.0, 4.0], log=True)["scale"] == "log ratio"


def _results(test_acc_lb, sharp_lb):
    seeds = range(len(test_acc_lb))
    runs = []
    for s in seeds:
        runs.append({"role": "sb", "seed": s, "batch": 8, "train_acc": 1.0, "test_acc": 0.9 + 0.01 * s,
                     "dist_from_init": 3.0})
        runs.append({"role": "lb", "seed": s, "batch": 64, "train_acc": 1.0, "test_acc": test_acc_lb[s],
                     "dist_from_init": 1.0})
    sharp = [{"role": role, "seed": s, "eps": 1e-3, "solver": "lbfgsb", "space": "full",
              "value": 1.0 + 0.1 * s if role == "sb" else sharp_lb[s]} for s in seeds for role in ("sb", "lb")]
    return {"config": {"subspace_dim": 100, "eps": [1e-3], "solvers": ["lbfgsb"]},
            "models": {"f1": {"runs": runs, "sharpness": sharp, "curvature": []}}}


def test_tables_say_how_many_seeds_a_mean_covers():
    # A diverged LB run (NaN) left the table's mean ± std over the other seeds with nothing saying so.
    s = summarize(_results([0.8, float("nan"), 0.82], [9.0, float("nan"), 11.0]))["models"]["f1"]
    t2 = {r["metric"]: r for r in s["tables"]["table2_accuracy"]}
    assert t2["test_acc"]["lb"] == "81.00 ± 1.41 (n=2 of 3)" and t2["test_acc"]["sb"] == "91.00 ± 1.00"
    t3 = s["tables"]["table3_sharpness_full"][0]
    assert t3["lb"] == "10.00 ± 1.41 (n=2 of 3)" and t3["sb"] == "1.10 ± 0.10"
    v = next(v for v in s["verdicts"] if v["claim"].startswith("LB sharper"))
    assert "LB 10.00 ± 1.41 (n=2 of 3)" in v["measured"] and "paired over 2 seeds" in v["statistic"]
    # Complete data: the plain mean ± std.
    s = summarize(_results([0.8, 0.81, 0.82], [9.0, 10.0, 11.0]))["models"]["f1"]
    assert s["tables"]["table3_sharpness_full"][0]["lb"] == "10.00 ± 1.00"


def test_one_seed_verdicts_of_nan_are_not_measured():
    # A diverged evaluation (NaN) compared False and read "not reproduced (one seed)"; the peak of
    # the tracked λ_max was max() over a list holding a NaN, which depends on where the NaN stands.
    nan = float("nan")
    r = _results([0.8, 0.81, 0.82], [9.0, 10.0, 11.0])
    m = r["models"]["f1"]
    alphas = [-1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0]
    m["curves"] = {"linear": {"train": {"alphas": alphas, "loss": [3, 2, 1, 1.5, 0.5, nan, 9], "accuracy": [0.5] * 7}}}
    m["slices"] = {"sb": {"alphas": [-1, 0, 1], "loss": [2.0, 1.0, 2.0]}, "lb": {"alphas": [-1, 0, 1], "loss": [nan, 1.0, 9.0]}}
    m["runs"][0]["tracking"] = [{"epoch": 1, "eval_loss": 1.0, "lambda_max": nan}, {"epoch": 2, "eval_loss": 0.5, "lambda_max": 4.0}]
    m["runs"][1]["tracking"] = [{"epoch": 1, "eval_loss": 1.0, "lambda_max": 9.0}, {"epoch": 2, "eval_loss": 0.5, "lambda_max": nan}]
    s = summarize(r)["models"]["f1"]
    verdict = {v["claim"].split(":")[0]: v for v in s["verdicts"]}
    assert verdict["Fig. 2/3 (linear path)"]["verdict"] == "not measured"
    assert verdict["Filter-normalised random-direction slices (Li et al.)"]["verdict"] == "not measured"
    assert verdict["Fig. 6"]["verdict"] == "not measured"
    assert s["tracking"]["peak"] == {"sb": 4.0, "lb": 9.0}
    # Finite values: as before.
    m["slices"]["lb"]["loss"][0] = 9.0
    m["runs"][1]["tracking"][1]["lambda_max"] = 8.0
    verdict = {v["claim"].split(":")[0]: v["verdict"] for v in summarize(r)["models"]["f1"]["verdicts"]}
    assert verdict["Filter-normalised random-direction slices (Li et al.)"] == "reproduced (one seed)"
    assert verdict["Fig. 6"] == "reproduced (one seed)"


def test_trend_statistic_says_how_many_points_a_p_value_used():
    r = _results([0.8, 0.81, 0.82], [9.0, 10.0, 11.0])
    r["models"]["f1"]["sweep"] = [{"batch": 8 * 2 ** i, "sharpness": [1.0, 2.0, float("nan"), 4.0, 5.0][i],
                                   "test_acc": 0.9 - 0.01 * i, "lambda_max": 1.0 + i} for i in range(5)]
    v = next(v for v in summarize(r)["models"]["f1"]["verdicts"] if v["claim"].startswith("Fig. 4"))
    # ρ = 1 over the 4 finite points: p = 2/24, not the 2/120 of 5 points.
    assert "p = 0.083 (sharpness, 4 of 5 points) / 0.017 (test accuracy)," in v["statistic"]
    assert v["verdict"] == "same direction, not significant"
