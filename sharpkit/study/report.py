"""Turn a study's raw results into the paper's tables, figures and per-claim verdicts, and write
``results.json``, CSV tables, PNG figures and a self-contained ``report.html``."""
from __future__ import annotations

import base64
import csv
import html
import io
import itertools
import json
import math
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import numpy as np

from .store import atomic_write_bytes, atomic_write_text

__all__ = ["summarize", "write_outputs", "PAPER"]

# Keskar et al. 2017, Tables 2-4 (mean, std over 5 runs), for the networks the study mimics.
PAPER = {
    "f1": {
        "net": "F1 (MNIST)",
        "train_acc": {"sb": (99.66, 0.05), "lb": (99.92, 0.01)},
        "test_acc": {"sb": (98.03, 0.07), "lb": (97.81, 0.07)},
        "full": {1e-3: {"sb": (1.23, 0.83), "lb": (205.14, 69.52)}, 5e-4: {"sb": (0.61, 0.27), "lb": (42.90, 17.14)}},
        "sub": {1e-3: {"sb": (0.11, 0.00), "lb": (9.22, 0.56)}, 5e-4: {"sb": (0.05, 0.00), "lb": (9.17, 0.14)}},
    },
    "c1": {
        "net": "C1 (CIFAR-10)",
        "train_acc": {"sb": (99.89, 0.02), "lb": (99.66, 0.2)},
        "test_acc": {"sb": (80.04, 0.12), "lb": (77.26, 0.42)},
        "full": {1e-3: {"sb": (28.58, 3.13), "lb": (707.23, 43.04)}, 5e-4: {"sb": (7.08, 0.88), "lb": (227.31, 23.23)}},
        "sub": {1e-3: {"sb": (2.18, 0.23), "lb": (137.25, 21.60)}, 5e-4: {"sb": (0.71, 0.15), "lb": (29.50, 7.48)}},
    },
}


# ---------------------------------------------------------------------- statistics
def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0 for a single value; NaN for none)."""
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=np.float64)
    if v.size == 0:
        return math.nan, math.nan
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


def paired_test(sb: Sequence[float], lb: Sequence[float], lb_greater: bool = True, log: bool = False) -> dict:
    """Paired comparison over seeds of LB against SB.

    The per-seed difference ``d = lb - sb`` (``log(lb / sb)`` with ``log=True``, for quantities
    that differ by factors) gives the paired t statistic ``mean(d) / (std(d) / sqrt(n))`` and a
    one-sided p-value for the claimed direction (``lb_greater``).  With ``log=True`` and a value
    <= 0 among the pairs (an ascent that found no higher loss, a negative trace estimate) there is
    no log ratio: the test is then on the plain differences of every pair, without a geometric
    ratio, and ``scale`` says so (dropping such a seed dropped the strongest evidence).  When every
    difference is the same (up to rounding: a spread within 1e-12 of the values' scale) the t
    statistic is undefined: the p-value is then the exact one-sided sign test's (``0.5 ** n`` when
    all differences lie in the claimed direction, 1 otherwise), and ``test`` says so.  The verdict: "reproduced" (right direction, p < 0.05, n >= 3), "same direction, not
    significant", "same direction (too few seeds to test)" (n < 3, every seed agrees) or
    "not reproduced".
    """
    from scipy import stats

    pairs = [(a, b) for a, b in zip(sb, lb) if a is not None and b is not None and np.isfinite(a) and np.isfinite(b)]
    n = len(pairs)
    if n == 0:
        out = {"n": 0, "verdict": "not measured", "t": math.nan, "p": math.nan, "mean_diff": math.nan, "test": "none"}
        return {**out, "ratio_geomean": math.nan, "scale": "log ratio"} if log else out
    a = np.array([p[0] for p in pairs], dtype=np.float64)
    b = np.array([p[1] for p in pairs], dtype=np.float64)
    log_scale = log and bool(np.all(a > 0) and np.all(b > 0))
    d = np.log(b / a) if log_scale else b - a
    # Rounding leaves nominally equal differences a last-bit spread (t ~ 1e16): count it as none.
    tiny = 1e-12 * (1.0 + float(np.max(np.abs(d))) if log_scale else float(max(np.max(np.abs(a)), np.max(np.abs(b)))))
    sign = 1.0 if lb_greater else -1.0
    mean_d = float(d.mean())
    right = sign * mean_d > 0
    all_right = bool(np.all(sign * d > 0))
    t, p, test = math.nan, math.nan, "none (one seed)"
    if n >= 2 and d.std(ddof=1) > tiny:
        t = float(mean_d / (d.std(ddof=1) / math.sqrt(n)))
        p, test = float(stats.t.sf(sign * t, df=n - 1)), "paired t-test"
    elif n >= 2:  # equal differences: no t statistic; the sign test still weighs n agreeing seeds
        p, test = (0.5 ** n if all_right else 1.0), "sign test (every difference equal)"
    if not right:
        verdict = "not reproduced"
    elif n >= 3 and p < 0.05:
        verdict = "reproduced"
    elif n >= 3:
        verdict = "same direction, not significant"
    else:
        verdict = "same direction (too few seeds to test)" if all_right else "not reproduced"
    out = {"n": n, "t": t, "p": p, "test": test, "mean_diff": mean_d, "verdict": verdict,
           "seeds_agreeing": int(np.sum(sign * d > 0))}
    if log:
        out["ratio_geomean"] = float(np.exp(mean_d)) if log_scale else math.nan
        out["scale"] = "log ratio" if log_scale else "difference"
    return out


# Spearman p-values come from permutations, not the t-approximation, which is anti-conservative
# for few points (p = 0 for rho = 1 at n = 3 or 4): exact (all n! orderings, 40320 at 8) up to
# SPEARMAN_EXACT_MAX_N points, else SPEARMAN_RESAMPLES random orderings drawn from a fixed seed.
SPEARMAN_EXACT_MAX_N = 8
SPEARMAN_RESAMPLES = 20000


class Spearman(NamedTuple):
    rho: float
    p: float  # two-sided
    n: int  # finite pairs used
    test: str  # how p was computed


def spearman(x: Sequence[float], y: Sequence[float]) -> Spearman:
    """Spearman's rank correlation of the finite pairs and its two-sided permutation p-value: the
    share of orderings of y's ranks whose |rho| reaches the observed one, over all orderings up
    to ``SPEARMAN_EXACT_MAX_N`` points, else ``(1 + hits) / (1 + SPEARMAN_RESAMPLES)`` over random
    orderings (seeded, so reports are reproducible).  NaN for fewer than 3 points or constant data."""
    from scipy import stats

    pts = [(a, b) for a, b in zip(x, y) if a is not None and b is not None and np.isfinite(a) and np.isfinite(b)]
    n = len(pts)
    if n < 3:
        return Spearman(math.nan, math.nan, n, "none (fewer than 3 points)")
    rx = stats.rankdata([p[0] for p in pts]) - (n + 1) / 2
    ry = stats.rankdata([p[1] for p in pts]) - (n + 1) / 2
    scale = math.sqrt(float(rx @ rx) * float(ry @ ry))
    if scale == 0:
        return Spearman(math.nan, math.nan, n, "none (constant values)")
    rho = float(rx @ ry) / scale
    if n <= SPEARMAN_EXACT_MAX_N:
        orders, test = np.array(list(itertools.permutations(range(n)))), "exact permutation test"
    else:
        orders = np.random.default_rng(0).permuted(np.tile(np.arange(n), (SPEARMAN_RESAMPLES, 1)), axis=1)
        test = f"permutation test, {SPEARMAN_RESAMPLES} random orderings"
    hits = int(np.sum(np.abs(ry[orders] @ rx) / scale >= abs(rho) - 1e-9))  # ties with |rho| count despite rounding
    p = hits / len(orders) if n <= SPEARMAN_EXACT_MAX_N else (1 + hits) / (1 + len(orders))
    return Spearman(rho, p, n, test)


# ---------------------------------------------------------------------- summary
def _by_role(runs: list[dict], field: str, scale: float = 1.0) -> dict[str, list]:
    out: dict[str, list] = {"sb": [], "lb": []}
    for r in sorted(runs, key=lambda r: r["seed"]):
        v = r.get(field)
        out[r["role"]].append(None if v is None else v * scale)
    return out


def _sharp_values(rows: list[dict], eps: float, solver: str, space: str) -> dict[str, list]:
    out: dict[str, dict] = {"sb": {}, "lb": {}}
    for r in rows:
        if r["eps"] == eps and r["solver"] == solver and r["space"] == space:
            out[r["role"]][r["seed"]] = r["value"]
    seeds = sorted(set(out["sb"]) | set(out["lb"]))
    return {role: [out[role].get(s) for s in seeds] for role in ("sb", "lb")}


def _fmt(ms: tuple[float, float], digits: int = 2) -> str:
    m, s = ms
    if m is None or not np.isfinite(m):
        return "n/a"
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def _cell(values: Sequence[float | None], digits: int = 2) -> str:
    """Mean ± std of a table cell, with how many seeds it covers when some are missing or not
    finite (a diverged run): "81.00 ± 1.41 (n=2 of 3)"."""
    text = _fmt(mean_std(values), digits)
    k = sum(v is not None and bool(np.isfinite(v)) for v in values)
    return f"{text} (n={k} of {len(values)})" if 0 < k < len(values) else text


def summarize(results: dict) -> dict:
    """Tables (with the paper's numbers beside ours) and one verdict per claim, per model."""
    cfg = results["config"]
    summary: dict[str, Any] = {"models": {}}
    for spec, m in results["models"].items():
        paper = PAPER.get(_paper_net(spec))
        runs = m["runs"]
        s: dict[str, Any] = {"tables": {}, "verdicts": []}
        verdicts = s["verdicts"]
        # Table 2
        rows = []
        for split in ("train_acc", "test_acc"):
            v = _by_role(runs, split, 100.0)
            row = {"metric": split, "sb": _cell(v["sb"]), "lb": _cell(v["lb"])}
            if paper:
                row.update(paper_sb=_fmt(paper[split]["sb"]), paper_lb=_fmt(paper[split]["lb"]))
            rows.append(row)
        s["tables"]["table2_accuracy"] = rows
        acc = _by_role(runs, "test_acc", 100.0)
        t = paired_test(acc["sb"], acc["lb"], lb_greater=False)
        gap = mean_std([a - b for a, b in zip(acc["sb"], acc["lb"]) if a is not None and b is not None])
        verdicts.append(_verdict("Generalization gap: LB test accuracy below SB (Table 2)",
                                 f"gap {_fmt(gap)} points (SB − LB)",
                                 (f"paper: {paper['test_acc']['sb'][0] - paper['test_acc']['lb'][0]:.2f} points"
                                  if paper else ""), t))
        tr = _by_role(runs, "train_acc", 100.0)
        s["train_accuracy_note"] = f"train accuracy SB {_cell(tr['sb'])} %, LB {_cell(tr['lb'])} %"
        # Tables 3 and 4
        for space, tname, pkey in (("full", "table3_sharpness_full", "full"),
                                   (f"p={cfg['subspace_dim']}", "table4_sharpness_subspace", "sub")):
            rows = []
            for eps in cfg["eps"]:
                for solver in cfg["solvers"]:
                    v = _sharp_values(m["sharpness"], eps, solver, space)
                    if not v["sb"]:
                        continue
                    row = {"eps": eps, "solver": solver, "sb": _cell(v["sb"]), "lb": _cell(v["lb"])}
                    if paper and eps in paper[pkey]:
                        row.update(paper_sb=_fmt(paper[pkey][eps]["sb"]), paper_lb=_fmt(paper[pkey][eps]["lb"]))
                    test = paired_test(v["sb"], v["lb"], lb_greater=True, log=True)
                    row["lb_over_sb"] = test.get("ratio_geomean", math.nan)
                    rows.append(row)
                    pap = ""
                    if paper and eps in paper[pkey]:
                        pap = f"paper: LB/SB = {paper[pkey][eps]['lb'][0] / paper[pkey][eps]['sb'][0]:.0f}x"
                    verdicts.append(_verdict(
                        f"LB sharper than SB: ε-sharpness, {'full space' if space == 'full' else 'random subspace ' + space}, "
                        f"ε={eps:g}, {solver}",
                        f"SB {row['sb']}, LB {row['lb']}; LB/SB {_ratio(test)}", pap, test))
            s["tables"][tname] = rows
        # Curvature
        rows, lam, trc = [], {"sb": [], "lb": []}, {"sb": [], "lb": []}
        for c in sorted(m["curvature"], key=lambda c: c["seed"]):
            lam[c["role"]].append(c["lambda_max"]["value"] if c["lambda_max"] else None)
            trc[c["role"]].append(c["trace"]["value"] if c["trace"] else None)
        for name, v in (("lambda_max", lam), ("trace", trc)):
            test = paired_test(v["sb"], v["lb"], lb_greater=True, log=True)
            rows.append({"metric": name, "sb": _cell(v["sb"], 3), "lb": _cell(v["lb"], 3),
                         "lb_over_sb": test.get("ratio_geomean", math.nan)})
            verdicts.append(_verdict(f"LB has larger Hessian {'top eigenvalue' if name == 'lambda_max' else 'trace'}",
                                     f"SB {rows[-1]['sb']}, LB {rows[-1]['lb']}; LB/SB {_ratio(test)}", "", test))
        s["tables"]["curvature"] = rows
        # Distance from the start
        d = _by_role(runs, "dist_from_init")
        ratios = [a / b for a, b in zip(d["sb"], d["lb"]) if a and b]
        test = paired_test(d["sb"], d["lb"], lb_greater=False, log=True)
        s["distance_ratio"] = {"mean_std": mean_std(ratios), "per_seed": ratios,
                               "sb": mean_std(d["sb"]), "lb": mean_std(d["lb"])}
        verdicts.append(_verdict("LB iterates stay closer to the start: ‖x_SB − x₀‖ / ‖x_LB − x₀‖ > 1",
                                 f"ratio {_fmt(mean_std(ratios))}", "paper: 3–10", test))
        # Fig 2/3: flatness around each end of the path
        s["curves"] = {}
        for path, splits in m.get("curves", {}).items():
            tr_curve = splits.get("train")
            if not tr_curve:
                continue
            a = np.asarray(tr_curve["alphas"])
            loss = np.asarray(tr_curve["loss"])
            rise = {}
            for end, at in (("sb", 0.0), ("lb", 1.0)):
                i = int(np.argmin(np.abs(a - at)))
                nb = [j for j in (i - 1, i + 1) if 0 <= j < a.size]
                rise[end] = float(np.mean([(loss[j] - loss[i]) / abs(a[j] - a[i]) for j in nb]))
            mid = loss[(a > 0) & (a < 1)]
            barrier = float(mid.max() - max(loss[int(np.argmin(np.abs(a)))], loss[int(np.argmin(np.abs(a - 1)))])) if mid.size else math.nan
            s["curves"][path] = {"rise_sb": rise["sb"], "rise_lb": rise["lb"], "barrier": barrier}
            verdicts.append({"claim": f"Fig. {'2/3' if path == 'linear' else '7'} ({path} path): loss rises faster around the LB end than around SB",
                             "measured": f"slope of train loss next to LB {rise['lb']:.3g}, next to SB {rise['sb']:.3g} per unit α; "
                                         f"barrier between them {barrier:.3g}",
                             "paper": "paper: flat around SB, sharp around LB",
                             "statistic": "one seed (the lowest)", "verdict": _one_seed(rise["lb"], rise["sb"])})
        # Li et al. slices: loss increase at the ends of the filter-normalised slice
        if m.get("slices") and all(m["slices"].get(r) for r in ("sb", "lb")):
            rise = {}
            for role in ("sb", "lb"):
                c = m["slices"][role]
                a, loss = np.asarray(c["alphas"]), np.asarray(c["loss"])
                rise[role] = float(np.mean(loss[np.abs(a) >= 0.5 - 1e-9]) - loss[int(np.argmin(np.abs(a)))])
            s["slices"] = rise
            verdicts.append({"claim": "Filter-normalised random-direction slices (Li et al.): loss rises more around LB",
                             "measured": f"mean loss increase for |α| ≥ 0.5: SB {rise['sb']:.3g}, LB {rise['lb']:.3g}",
                             "paper": "Li et al. 2018: LB minimizers look sharper under filter normalisation",
                             "statistic": "one seed (the lowest)",
                             "verdict": _one_seed(rise["lb"], rise["sb"])})
        # Fig 6: sharpness along training
        # The pipeline tracks one seed (the smallest; studies before that tracked the first listed):
        # read the runs that carry tracking.
        track = {r["role"]: r["tracking"] for r in runs if "tracking" in r}
        lam_end = {role: next((h["lambda_max"] for h in reversed(track.get(role, [])) if h.get("lambda_max") is not None), None)
                   for role in ("sb", "lb")}
        # The peak over finite values (max() over a NaN depended on where the NaN stood); a NaN at the
        # end (a diverged evaluation) is reported and gives "not measured".
        lam_peak = {role: max((h["lambda_max"] for h in track.get(role, []) if h.get("lambda_max") is not None
                               and not math.isnan(h["lambda_max"])), default=None)
                    for role in ("sb", "lb")}
        if lam_end["sb"] is not None and lam_end["lb"] is not None:
            verdicts.append({"claim": "Fig. 6: at the end of training LB is sharper (top eigenvalue) than SB",
                             "measured": f"λ_max at end: SB {lam_end['sb']:.3g} (peak {_g3(lam_peak['sb'])}), LB {lam_end['lb']:.3g} "
                                         f"(peak {_g3(lam_peak['lb'])})",
                             "paper": "paper: SB sharpness falls late in training, LB stays high",
                             "statistic": "one seed (the lowest)", "verdict": _one_seed(lam_end["lb"], lam_end["sb"])})
        s["tracking"] = {"end": lam_end, "peak": lam_peak}
        # Fig 4 / 5 / noise scale
        if m.get("sweep"):
            sw = m["sweep"]
            b = [r["batch"] for r in sw]
            sh = spearman(b, [r["sharpness"] for r in sw])
            ac = spearman(b, [r["test_acc"] for r in sw])
            lam = spearman(b, [r["lambda_max"] for r in sw])
            jump = _jump(sw)
            s["sweep"] = {"spearman_sharpness": sh.rho, "p_sharpness": sh.p, "spearman_test_acc": ac.rho,
                          "p_test_acc": ac.p, "p_test": sh.test, "spearman_lambda_max": lam.rho, "jump_batch": jump}
            verdicts.append({"claim": "Fig. 4: sharpness grows and test accuracy falls with batch size",
                             "measured": f"Spearman ρ(batch, sharpness) = {sh.rho:.2f}, ρ(batch, λ_max) = {lam.rho:.2f}, "
                                         f"ρ(batch, test acc) = {ac.rho:.2f}; largest sharpness jump at batch {jump}",
                             "paper": "paper: a threshold beyond which sharpness jumps and accuracy drops",
                             "statistic": f"{len(sw)} batch sizes, one seed; {_spearman_stat(sh, ac, len(sw))}",
                             "verdict": _trend_verdict(sh.rho, sh.p, +1, ac.rho, -1)})
        if m.get("warm_start"):
            ws = m["warm_start"]
            k = [r["k"] for r in ws]
            sh = spearman(k, [r["sharpness"] for r in ws])
            ac = spearman(k, [r["test_acc"] for r in ws])
            s["warm_start"] = {"spearman_sharpness": sh.rho, "p_sharpness": sh.p, "spearman_test_acc": ac.rho,
                               "p_test_acc": ac.p, "p_test": sh.test}
            verdicts.append({"claim": "Fig. 5: warm-starting LB from later SB iterates gives flatter, better minimizers",
                             "measured": f"Spearman ρ(k, sharpness) = {sh.rho:.2f}, ρ(k, test acc) = {ac.rho:.2f}",
                             "paper": "paper: sharpness falls and test accuracy rises with k",
                             "statistic": f"{len(ws)} values of k, one seed; {_spearman_stat(sh, ac, len(ws))}",
                             "verdict": _trend_verdict(sh.rho, sh.p, -1, ac.rho, +1)})
        if m.get("noise_scale"):
            bs = [r["b_simple"] for r in m["noise_scale"] if r.get("b_simple") is not None and np.isfinite(r["b_simple"])]
            jump = s.get("sweep", {}).get("jump_batch")
            if bs:
                lo, hi = min(bs), max(bs)
                s["noise"] = {"b_simple_min": lo, "b_simple_max": hi, "jump_batch": jump}
                consistent = jump is not None and lo / 2 <= jump <= hi * 2
                verdict = "not measured" if jump is None else ("consistent" if consistent else "not consistent")
                verdicts.append({"claim": "Gradient noise scale B_simple predicts the batch size where sharpness jumps",
                                 "measured": f"B_simple along SB training {lo:.0f}–{hi:.0f} samples; sweep's sharpness jump at "
                                             f"batch {jump}",
                                 "paper": "McCandlish et al.: critical batch ≈ B_simple",
                                 "statistic": "consistent = jump within a factor 2 of the B_simple range",
                                 "verdict": verdict})
        summary["models"][spec] = s
    return summary


def _paper_net(spec: str) -> str | None:
    """The paper's network a study model stands for: ``f1``/``c1`` whatever their sizes (a sized
    ``f1(width=64,depth=3)`` got no paper numbers beside its tables, unlike plain ``f1``, which
    the study builds at its own, equally reduced, sizes); None for a ``module:factory``."""
    from .models import MODEL_NAMES, parse_model_spec

    try:
        name = parse_model_spec(spec)[0]
    except ValueError:
        return None
    return name if name in MODEL_NAMES else None


def _jump(sweep: list[dict]) -> int | None:
    """Batch size at the largest increase of log sharpness (ε-sharpness, else λ_max) between
    consecutive sweep points."""
    field = "sharpness" if any(r.get("sharpness") for r in sweep) else "lambda_max"
    pts = [(r["batch"], r[field]) for r in sweep if r.get(field) is not None and r[field] > 0]
    if len(pts) < 2:
        return None
    steps = [(math.log(b2[1] / b1[1]), b2[0]) for b1, b2 in zip(pts, pts[1:])]
    return max(steps)[1]


def _one_seed(lb: float, sb: float) -> str:
    """Verdict of a one-seed claim that LB's value exceeds SB's; "not measured" where either is NaN
    (a diverged evaluation compared False and read "not reproduced")."""
    if math.isnan(lb) or math.isnan(sb):
        return "not measured"
    return "reproduced (one seed)" if lb > sb else "not reproduced (one seed)"


def _g3(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3g}"


def _trend_verdict(rho_s: float, p_s: float, sign_s: int, rho_a: float, sign_a: int) -> str:
    """Verdict on a sharpness trend (rank correlation ``rho_s`` expected to have sign ``sign_s``)
    together with the accuracy trend ``rho_a`` (expected sign ``sign_a``)."""
    if not np.isfinite(rho_s):
        return "not measured"
    if sign_s * rho_s <= 0:
        return "not reproduced"
    acc_ok = np.isfinite(rho_a) and sign_a * rho_a > 0
    if np.isfinite(p_s) and p_s < 0.05:
        return "reproduced" if acc_ok else "sharpness trend reproduced, accuracy trend not"
    return "same direction, not significant" if acc_ok else "sharpness same direction (not significant), accuracy trend not"


def _spearman_stat(sharpness: Spearman, accuracy: Spearman, points: int) -> str:
    """The p-values and tests; how many points each used where some were not finite (a p-value
    over 4 of 5 batch sizes read as one over 5)."""
    tests = sorted({sharpness.test, accuracy.test})
    def used(r: Spearman) -> str:
        return f", {r.n} of {points} points" if r.n < points else ""

    return (f"two-sided p = {sharpness.p:.2g} (sharpness{used(sharpness)}) / {accuracy.p:.2g} "
            f"(test accuracy{used(accuracy)}), "
            f"{' / '.join(tests)}")


def _ratio(test: dict) -> str:
    r = test.get("ratio_geomean")
    return "n/a" if r is None or not np.isfinite(r) else f"{r:.3g}x (geometric mean over seeds)"


def _verdict(claim: str, measured: str, paper: str, test: dict) -> dict:
    if not test["n"]:
        stat = "not measured"
    elif test["test"] == "paired t-test":
        stat = f"paired over {test['n']} seeds: t = {test['t']:.2f}, one-sided p = {test['p']:.2g}"
    elif test["n"] >= 2:
        stat = f"paired over {test['n']} seeds: every difference equal, so no t; {test['test']}: one-sided p = {test['p']:.2g}"
    else:
        stat = "one seed: no test"
    if test["n"] and test.get("scale") == "difference":
        stat += " (on differences: a value ≤ 0 has no log ratio)"
    return {"claim": claim, "measured": measured, "paper": paper, "statistic": stat, "verdict": test["verdict"]}


# ---------------------------------------------------------------------- outputs
def _clean(obj: Any) -> Any:
    """JSON-safe copy: NaN/inf -> None, tuples -> lists, numpy scalars -> Python numbers."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        f = float(obj)
        return f if math.isfinite(f) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def _write_csv(path: Path, rows: list[dict]) -> list[str]:
    """Write ``rows`` as CSV at ``path`` (nothing for no rows); the names of the files written."""
    if not rows:
        return []
    fields: list[str] = []
    for r in rows:
        fields += [k for k in r if k not in fields]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields)
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if v is None else v) for k, v in r.items()})
    atomic_write_text(path, buf.getvalue())
    return [path.name]


def write_outputs(results: dict, out: Path) -> dict:
    """Add the summary to ``results`` and write results.json, *.csv, fig_*.png and report.html.

    Tables and figures that the previous results.json in ``out`` lists and this study did not write
    (a model dropped, or no longer the one swept, in a re-run with other settings) are removed, so
    that every table and figure in ``out`` shows the numbers of results.json.
    """
    out.mkdir(parents=True, exist_ok=True)
    before = _previous_outputs(out)
    results["summary"] = summarize(results)
    figures = make_figures(results, out)
    results["figures"] = [f.name for f in figures]
    results["tables"] = _write_tables(results, out)
    # Before results.json is replaced: an interrupted write leaves the stale names listed there.
    for name in sorted(before - set(results["figures"]) - set(results["tables"])):
        try:
            (out / name).unlink()
        except FileNotFoundError:
            pass
    atomic_write_text(out / "results.json", json.dumps(_clean(results), indent=1))
    atomic_write_text(out / "report.html", render_html(results, figures))
    return results


def _previous_outputs(out: Path) -> set[str]:
    """The tables and figures the results.json in ``out`` lists (an unreadable one: none), as plain
    file names.  Results from before the ``tables`` list name their per-model tables in their summary."""
    try:
        prev = json.loads((out / "results.json").read_text(encoding="utf-8"))
        names = set(prev.get("figures") or []) | set(prev.get("tables") or [])
        if "tables" not in prev:
            for spec, s in prev.get("summary", {}).get("models", {}).items():
                names |= {f"{tname}_{spec}.csv" for tname in s.get("tables", {})}
    except (OSError, ValueError, TypeError, AttributeError):
        return set()
    return {n for n in names if isinstance(n, str) and n == Path(n).name and n.endswith((".png", ".csv"))
            and n not in (".png", ".csv")}


def _write_tables(results: dict, out: Path) -> list[str]:
    """Write the CSV tables; returns the names of the files written."""
    runs, sharp, curv, verdicts, sweep, warm, noise, track = [], [], [], [], [], [], [], []
    written: list[str] = []
    for spec, m in results["models"].items():
        for r in m["runs"]:
            runs.append({"model": spec, **{k: v for k, v in r.items() if k not in ("tracking", "loss_history")}})
            for h in r.get("tracking", []):
                track.append({"model": spec, "role": r["role"], "seed": r["seed"], **h})
        sharp += [{"model": spec, **r} for r in m["sharpness"]]
        for c in m["curvature"]:
            curv.append({"model": spec, "role": c["role"], "seed": c["seed"],
                         "lambda_max": (c["lambda_max"] or {}).get("value"),
                         "lambda_max_matvecs": (c["lambda_max"] or {}).get("num_matvecs"),
                         "trace": (c["trace"] or {}).get("value"), "trace_stderr": (c["trace"] or {}).get("stderr")})
        sweep += [{"model": spec, **r} for r in m.get("sweep", [])]
        warm += [{"model": spec, **r} for r in m.get("warm_start", [])]
        noise += [{"model": spec, **r} for r in m.get("noise_scale", [])]
        s = results["summary"]["models"][spec]
        verdicts += [{"model": spec, **v} for v in s["verdicts"]]
        for tname, rows in s["tables"].items():
            written += _write_csv(out / f"{tname}_{spec}.csv", rows)
    for name, rows in (("runs", runs), ("sharpness", sharp), ("curvature", curv), ("verdicts", verdicts),
                       ("sweep", sweep), ("warm_start", warm), ("noise_scale", noise), ("tracking", track)):
        written += _write_csv(out / f"{name}.csv", rows)
    return written


# ---------------------------------------------------------------------- figures
def make_figures(results: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths: list[Path] = []

    def save(fig, name):
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100)  # constrained layout: one draw, no bbox pass
        plt.close(fig)
        atomic_write_bytes(out / name, buf.getvalue())
        paths.append(out / name)

    for spec, m in results["models"].items():
        for path, splits in m.get("curves", {}).items():
            if not splits.get("train"):
                continue
            fig, ax = plt.subplots(figsize=(6.4, 4.4), layout="constrained")
            ax2 = ax.twinx()
            for split, style in (("train", "-"), ("test", "--")):
                c = splits.get(split)
                if not c:
                    continue
                ax.plot(c["alphas"], c["loss"], style, color="tab:blue", marker=".", label=f"{split} loss")
                ax2.plot(c["alphas"], [100 * a for a in c["accuracy"]], style, color="tab:red", marker=".", label=f"{split} accuracy")
            ax.set_yscale("log")
            ax.set_xlabel("α  (0 = SB minimizer, 1 = LB minimizer)")
            ax.set_ylabel("cross-entropy", color="tab:blue")
            ax2.set_ylabel("accuracy (%)", color="tab:red")
            for x in (0, 1):
                ax.axvline(x, color="grey", lw=0.6, ls=":")
            title = "x(α) = (1−α) x_SB + α x_LB" if path == "linear" else "x(α) = cos(απ/2) x_SB + sin(απ/2) x_LB"
            ax.set_title(f"{spec}: {title}\n(solid: train, dashed: test)", fontsize=10)
            h1, l1 = ax.get_legend_handles_labels()
            h2, l2 = ax2.get_legend_handles_labels()
            fig.legend(h1 + h2, l1 + l2, fontsize=8, loc="outside lower center", ncol=4)
            save(fig, f"fig_interp_{path}_{spec}.png")
        if m.get("slices"):
            fig, ax = plt.subplots(figsize=(6.4, 4.4), layout="constrained")
            for role, color in (("sb", "tab:green"), ("lb", "tab:purple")):
                c = m["slices"].get(role)
                if c:
                    ax.plot(c["alphas"], c["loss"], "-o", ms=3, color=color, label=f"{role.upper()} minimizer")
            ax.set_yscale("log")
            ax.set_xlabel("α: step along a filter-normalised random direction d (x + α d)")
            ax.set_ylabel("training cross-entropy (log scale)")
            ax.set_title(f"{spec}: 1-D random-direction slices (Li et al. 2018), lowest seed", fontsize=10)
            ax.legend()
            save(fig, f"fig_slice_{spec}.png")
        if m.get("sharpness"):
            cfg = results["config"]
            combos = [(e, so, sp) for sp in ("full", f"p={cfg['subspace_dim']}") for e in cfg["eps"] for so in cfg["solvers"]]
            combos = [c for c in combos if _sharp_values(m["sharpness"], *c)["sb"]]
            fig, ax = plt.subplots(figsize=(max(6.4, 1.1 * len(combos)), 4.4), layout="constrained")
            xs = np.arange(len(combos))
            for off, role, color in ((-0.18, "sb", "tab:green"), (0.18, "lb", "tab:purple")):
                ms = [mean_std(_sharp_values(m["sharpness"], *c)[role]) for c in combos]
                ax.bar(xs + off, [v[0] for v in ms], 0.36, yerr=[v[1] for v in ms], color=color, label=role.upper(), capsize=3)
            ax.set_xticks(xs, [f"{sp}\nε={e:g}\n{so}" for e, so, sp in combos], fontsize=8)
            ax.set_yscale("log")
            ax.set_ylabel("ε-sharpness (%)")
            ax.set_title(f"{spec}: ε-sharpness, SB vs LB (mean ± std over seeds)", fontsize=10)
            ax.legend()
            save(fig, f"fig_sharpness_{spec}.png")
        if m.get("sweep"):
            save(_trend_fig(plt, m["sweep"], "batch", "batch size (log scale)", f"{spec}: batch-size sweep (Fig. 4)",
                            m.get("extras_measure"), logx=True), f"fig_sweep_{spec}.png")
        if m.get("warm_start"):
            save(_trend_fig(plt, m["warm_start"], "k", "k: SB epochs before switching to LB",
                            f"{spec}: warm start (Fig. 5)", m.get("extras_measure"), logx=False), f"fig_warm_{spec}.png")
        tracked = [r for r in m["runs"] if r.get("tracking")]
        if any(h.get("lambda_max") is not None for r in tracked for h in r["tracking"]):
            fig, ax = plt.subplots(figsize=(6.4, 4.4), layout="constrained")
            for r in tracked:
                pts = [(h["eval_loss"], h["lambda_max"], h["epoch"]) for h in r["tracking"] if h.get("lambda_max") is not None]
                if not pts:
                    continue
                color = "tab:green" if r["role"] == "sb" else "tab:purple"
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "-o", ms=3, color=color,
                        label=f"{r['role'].upper()} (batch {r['batch']})")
                ax.annotate(f"ep {pts[-1][2]}", (pts[-1][0], pts[-1][1]), fontsize=7)
            ax.set_xscale("log")
            ax.invert_xaxis()
            ax.set_xlabel("training cross-entropy (log scale, decreasing →)")
            ax.set_ylabel("top Hessian eigenvalue λ_max")
            ax.set_title(f"{spec}: sharpness along training (Fig. 6), warm-started Lanczos", fontsize=10)
            ax.legend()
            save(fig, f"fig_tracking_{spec}.png")
    return paths


def _trend_fig(plt, rows, xkey, xlabel, title, measure, logx):
    fig, ax = plt.subplots(figsize=(6.4, 4.4), layout="constrained")
    ax2 = ax.twinx()
    x = [r[xkey] for r in rows]
    lab = f"ε-sharpness ({measure['solver']}, ε={measure['eps']:g})" if measure else "ε-sharpness"
    if any(r.get("sharpness") is not None for r in rows):
        ax.plot(x, [r["sharpness"] for r in rows], "-o", color="tab:purple", label=lab)
    if any(r.get("lambda_max") is not None for r in rows):
        ax.plot(x, [r["lambda_max"] for r in rows], "-s", color="tab:orange", label="λ_max")
    ax2.plot(x, [100 * r["test_acc"] for r in rows], "--^", color="tab:red", label="test accuracy")
    if logx:
        ax.set_xscale("log", base=2)
        ax.set_xticks(x, [str(v) for v in x])
        ax.minorticks_off()
    else:
        ax.set_xticks(x)
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("sharpness (log scale)")
    ax2.set_ylabel("test accuracy (%)", color="tab:red")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    fig.legend(h1 + h2, l1 + l2, fontsize=8, loc="outside lower center", ncol=3)
    ax.set_title(title, fontsize=10)
    return fig


# ---------------------------------------------------------------------- HTML
def _table(rows: list[dict]) -> str:
    if not rows:
        return "<p><em>not measured</em></p>"
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]

    def cell(v):
        if isinstance(v, float):
            return f"{v:.4g}" if math.isfinite(v) else "n/a"
        return html.escape(str(v))

    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{cell(r.get(c, ''))}</td>" for c in cols) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


_CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.6em 0 1.2em;font-size:.9em}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}
th{background:#f3f3f3}.ok{color:#176b1c;font-weight:600}.bad{color:#a11;font-weight:600}.meh{color:#a66a00;font-weight:600}
img{max-width:100%;border:1px solid #eee;margin:.4em 0}code{background:#f5f5f5;padding:0 3px}"""


def measure_commands(results: dict) -> list[str]:
    """The ``sharpkit audit`` line of each model of the study (empty for results without them)."""
    return [m["audit_command"] for m in results["models"].values() if m.get("audit_command")]


def _measure_section(results: dict) -> str:
    commands = measure_commands(results)
    if not commands:
        return ""
    specs = ", ".join(f"<code>{html.escape(m['spec'])}</code>" for m in results["models"].values() if m.get("spec"))
    return ("<h2>Measuring these checkpoints</h2><p>Each training's final weights are in "
            "<code>runs/&lt;model&gt;-b&lt;batch&gt;-s&lt;seed&gt;-&lt;key&gt;/final.pt</code> (its folder's "
            "<code>model.json</code> names the model), and the data the models were trained on are in "
            f"<code>{html.escape(results.get('train_data', 'train.npz'))}</code> (training split; the test split as "
            "x_test, y_test). The other commands (<code>sharpkit sharpness</code>, <code>spectrum</code>, "
            f"<code>landscape</code>, <code>audit</code>) measure them with the models' sizes, {specs}, and "
            "this data: there, plain <code>--model f1</code>/<code>c1</code> builds the paper's sizes and "
            "<code>--data mnist1d</code> holds other samples. To audit every run of a model (SB, LB, sweep and "
            "warm starts):</p><pre>" + html.escape("\n".join(commands)) + "</pre>")


def _curve_points(results: dict) -> int:
    """How many α the SB-LB curves have (the configured count, plus α = 0 and 1 where it lacked them)."""
    for m in results["models"].values():
        train = m.get("curves", {}).get("linear", {}).get("train")
        if train:
            return len(train["alphas"])
    return results["config"]["curve_points"]


def _model_line(spec: str, m: dict) -> str:
    """A model in the configuration table: its spec with the sizes it was built at, and its size
    (a sized spec's empty ``model_kwargs`` read '(2826 parameters, {})')."""
    built = m.get("spec") or spec
    sizes = f", {m['model_kwargs']}" if m.get("model_kwargs") and built == spec else ""
    return f"{spec}{f' = {built}' if built != spec else ''} ({m['num_params']} parameters{sizes})"


def _provenance_note(results: dict) -> str:
    """A warning when the trainings or measurements that the tables use were not all made in this
    run's environment (reused from DIR: another sharpkit version, another GPU or CPU model), with
    each provenance and its count; nothing when they all were (or results predate provenance)."""
    prov = results.get("provenance")
    if not prov or not prov.get("mixed"):
        return ""

    def line(what: str, entries: list[dict]) -> str:
        words = []
        for e in entries:
            p = e.get("provenance")
            if not isinstance(p, dict):
                where = "unknown (stored without provenance)"
            else:
                where = (f"sharpkit {p.get('sharpkit')}, torch {p.get('torch')}, {p.get('device')} "
                         f"({p.get('device_name')})")
            words.append(f"{e.get('count')} × {where}")
        return f"{what}: " + "; ".join(words)

    body = "; ".join(line(w, prov.get(w) or []) for w in ("trainings", "measurements") if prov.get(w))
    return ("<p class='meh'>The results reused from this folder were not all made in this run's environment "
            "(trainings are redone only for another device type, torch version or dtype, measurements also for "
            f"another sharpkit version): {html.escape(body)}.</p>")


def render_html(results: dict, figures: list[Path]) -> str:
    cfg, res, env = results["config"], results["resolved"], results["environment"]
    imgs = {p.name: base64.b64encode(p.read_bytes()).decode() for p in figures}
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>sharpkit study</title><style>{_CSS}</style></head><body>",
             "<h1>Large-batch vs small-batch: sharpness study</h1>",
             "<p>Reproduction of Keskar et al., <em>On Large-Batch Training for Deep Learning: Generalization Gap and "
             "Sharp Minima</em> (ICLR 2017) on this machine's setting. Paper numbers are for F1 on MNIST and C1 on "
             "CIFAR-10; here the data and widths differ (below), so compare directions and ratios, not absolute values.</p>"]
    if cfg.get("quick"):
        parts.append("<p class='meh'>--quick: the pipeline at smoke-test scale (few seeds, short training, "
                     "narrow nets); models are not trained to convergence, so the verdicts below say little about "
                     "the paper's claims. Run without --quick for the study.</p>")
    parts.append("<p>Notes: ε-sharpness is evaluated on training samples with BatchNorm in "
                 f"{html.escape(cfg['bn'])} mode. The random subspace A has i.i.d. N(0, 1) entries generated by "
                 "counter-based Philox from the seed (<code>sharpkit.ops.GaussianSubspace</code>); the paper does not "
                 "say how its A is drawn, so absolute subspace values are not comparable with its Table 4. "
                 "Verdicts compare SB and LB trained from the same initialisation (paired by seed); "
                 "p-values are one-sided paired t-tests on the per-seed differences (log ratios for sharpness "
                 "and curvature; plain differences where a value is ≤ 0), or sign tests where every difference "
                 "is equal. The trends of Fig. 4 and 5 "
                 "(one seed) are judged by Spearman rank correlations with two-sided p-values, exact "
                 f"permutation tests up to {SPEARMAN_EXACT_MAX_N} points (the t-approximation would give "
                 "p = 0 for a perfect ranking of 3 or 4 points).</p>")
    stats = results.get("stats", {})
    parts.append("<h2>Configuration</h2>" + _table([
        {"setting": "data", "value": f"{res['data_name']}: {res['n_train']} train / {res['n_test']} test, input {res['input_shape']}, {res['num_classes']} classes"},
        {"setting": "models", "value": ", ".join(_model_line(k, v) for k, v in results["models"].items())},
        {"setting": "batch sizes", "value": f"SB = {res['sb']}, LB = {res['lb']} (LB/SB = {res['lb_over_sb']:.1f})"},
        {"setting": "training", "value": f"Adam lr {cfg['lr']}, until the epoch loss stops improving by {cfg['min_rel_improvement']:.0%} for {cfg['patience']} epochs, capped at {res['epoch_cap_sb']} epochs at SB and {res['epoch_cap_lb']} at LB ({cfg['lb_epochs_factor']:g}× as many; geometric in between)"},
        {"setting": "seeds", "value": ", ".join(map(str, cfg["seeds"]))},
        {"setting": "ε-sharpness", "value": f"ε ∈ {cfg['eps']}, solvers {cfg['solvers']}, {cfg['sharpness_iters']} iterations, subspace p = {cfg['subspace_dim']} (Gaussian, Philox-seeded), on {res['sharpness_samples']} training samples, BN {cfg['bn']}"},
        {"setting": "Hessian", "value": f"λ_max by Lanczos (tol {cfg['eig_tol']}), trace by Hutch++ ({cfg['trace_matvecs']} matvecs), on {res['curvature_samples']} training samples"},
        {"setting": "curves", "value": f"{_curve_points(results)} points, α ∈ [−1, 2] (α = 0 and 1 among them), between the lowest seed's SB and LB minimizers; BatchNorm with batch statistics (chunks of up to 4096 samples), as in the authors' code; random-direction slices on {res['curvature_samples']} training samples, BN {cfg['bn']}"},
        {"setting": "environment", "value": f"sharpkit {env['sharpkit']}, torch {env['torch']}, device {env['device']} ({env['device_name']}), {env['threads']} threads"},
        {"setting": "wall time", "value": f"{results.get('wall_seconds', 0):.0f} s this invocation; trainings run {stats.get('trainings_run')}, reused {stats.get('trainings_reused')}; measurements run {stats.get('measurements_run')}, reused {stats.get('measurements_reused')}"},
    ]))
    parts.append(_provenance_note(results))
    if stats.get("unavailable"):
        parts.append("<p class='bad'>Not measured (API missing): " + html.escape("; ".join(stats["unavailable"])) + "</p>")
    parts.append(_measure_section(results))
    for spec, s in results["summary"]["models"].items():
        m = results["models"][spec]
        parts.append(f"<h2>Model {html.escape(spec)}</h2><h3>Verdicts</h3>")
        vrows = []
        for v in s["verdicts"]:
            cls = "ok" if v["verdict"].startswith(("reproduced", "consistent")) else ("bad" if v["verdict"].startswith("not") else "meh")
            vrows.append(f"<tr><td>{html.escape(v['claim'])}</td><td>{html.escape(v['measured'])}</td><td>{html.escape(v['paper'])}</td>"
                         f"<td>{html.escape(v['statistic'])}</td><td class='{cls}'>{html.escape(v['verdict'])}</td></tr>")
        parts.append("<table><thead><tr><th>claim</th><th>measured</th><th>paper</th><th>statistic</th><th>verdict</th></tr></thead>"
                     f"<tbody>{''.join(vrows)}</tbody></table>")
        titles = {"table2_accuracy": "Table 2: accuracy (%)", "table3_sharpness_full": "Table 3: ε-sharpness, full space",
                  "table4_sharpness_subspace": "Table 4: ε-sharpness, random subspace", "curvature": "Hessian top eigenvalue and trace"}
        for tname, rows in s["tables"].items():
            parts.append(f"<h3>{titles.get(tname, tname)}</h3>" + _table(rows))
        dr = s["distance_ratio"]
        parts.append(f"<p>‖x_SB − x₀‖ / ‖x_LB − x₀‖ = {_fmt(dr['mean_std'])} (paper: 3–10); {s['train_accuracy_note']}.</p>")
        parts.append(_table([{k: v for k, v in r.items() if k not in ("tracking", "key", "loss_history")} for r in m["runs"]]))
        if m.get("noise_scale"):
            parts.append("<h3>Gradient noise scale (SB run, lowest seed)</h3>" + _table(m["noise_scale"]))
        for name in sorted(imgs):
            if name.endswith(f"_{spec}.png"):
                parts.append(f"<figure><img alt='{html.escape(name)}' src='data:image/png;base64,{imgs[name]}'>"
                             f"<figcaption>{html.escape(name)}</figcaption></figure>")
    parts.append("</body></html>")
    return "\n".join(parts)
