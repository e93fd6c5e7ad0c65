"""Reference numbers for the study statistics (prelude/tests/analysis_stats.rs), from scipy.

Usage: ref_stats.py            prints one JSON object to stdout

Every number comes from a public scipy call (named beside it) or, for Holm, from a by-hand loop
over scipy's p-values (no statsmodels). Paired data whose ties matter are dyadic fractions
(0.125, 0.25, ...), so both sides parse them exactly and see the same ties.
"""
import json
import sys

import numpy as np
from scipy import optimize, stats

ALPHA = 0.05


def cases():
    rng = np.random.default_rng(14)
    sft8 = rng.uniform(0.4, 0.6, 8)
    dpo8 = sft8 + rng.normal(0.012, 0.01, 8)
    sft60 = rng.uniform(0.4, 0.6, 60)
    dpo60 = sft60 + rng.normal(0.004, 0.02, 60)
    sft20 = rng.uniform(0.4, 0.6, 20)
    dpo20 = sft20 + rng.normal(0.01, 0.02, 20)
    # (name, dpo, sft, smallest effect of interest or None)
    out = [
        ("n2", [0.62, 0.655], [0.60, 0.61], 0.02),
        ("n3", [0.55, 0.60, 0.52], [0.50, 0.61, 0.47], 0.02),
        ("n8", list(dpo8), list(sft8), 0.01),
        ("negative", [0.40, 0.43, 0.41, 0.38, 0.45], [0.46, 0.44, 0.47, 0.45, 0.47], 0.01),
        ("exact_n20", list(dpo20), list(sft20), None),
        ("normal_n60", list(dpo60), list(sft60), 0.01),
        # |d| = 0.25 three times, 0.125 twice: ties, n <= 13 -> scipy's permutation_test (all 2^6 flips).
        ("ties_small", [0.75, 0.75, 0.375, 1.0, 0.75, 0.625], [0.5, 0.5, 0.5, 0.5, 0.5, 0.5], None),
        # two zero differences, n = 7 -> permutation_test over the sign flips.
        ("zeros_small", [0.5, 0.625, 0.75, 0.5, 0.875, 0.4375, 0.5625], [0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5], None),
    ]
    # n = 20 with ties -> normal approximation with tie correction.
    d20 = [0.125, 0.25, 0.25, -0.125, 0.375, 0.5, 0.25, 0.125, -0.25, 0.375,
           0.625, 0.125, 0.25, 0.5, -0.375, 0.75, 0.25, 0.125, 0.5, 0.375]
    out.append(("ties_n20", [0.5 + d for d in d20], [0.5] * 20, None))
    # n = 30 with three zeros and ties -> normal approximation, zeros dropped.
    d30 = d20 + [0.0, 0.0, 0.0, 0.625, -0.5, 0.25, 0.875, 0.125, 0.25, 0.5]
    out.append(("zeros_n30", [0.5 + d for d in d30], [0.5] * 30, None))
    return out


def wilcoxon_mode(d):
    """The branch scipy 1.17's wilcoxon(method="auto") takes (scipy/stats/_wilcoxon.py)."""
    nonzero = np.abs(d[d != 0])
    ties = len(np.unique(nonzero)) < len(nonzero)
    if len(d) > 50:
        return "asymptotic"
    if not ties and len(nonzero) == len(d):
        return "exact"
    return "permutation" if len(d) <= 13 else "asymptotic"


def paired(name, dpo, sft, delta):
    dpo, sft = np.asarray(dpo, float), np.asarray(sft, float)
    d = dpo - sft
    n = len(d)
    mean, sd = float(np.mean(d)), float(np.std(d, ddof=1))
    sem = sd / np.sqrt(n)
    tt = stats.ttest_rel(dpo, sft)
    ci = stats.t.interval(1 - ALPHA, n - 1, loc=mean, scale=sem)
    w = stats.wilcoxon(dpo, sft)
    # The mode scipy's method="auto" took, checked by asking for it explicitly.
    mode = wilcoxon_mode(d)
    method = stats.PermutationMethod() if mode == "permutation" else mode
    w_mode = stats.wilcoxon(dpo, sft, method=method)
    assert np.isclose(w.pvalue, w_mode.pvalue, rtol=1e-12, atol=0), (name, w.pvalue, w_mode.pvalue)
    row = {
        "name": name, "dpo": list(map(float, dpo)), "sft": list(map(float, sft)), "smallest_effect": delta,
        "wilcoxon_mode": mode, "mean": mean, "sd": sd, "t": float(tt.statistic), "p": float(tt.pvalue),
        "t_interval": [float(ci[0]), float(ci[1])],
        "wilcoxon_statistic": float(w.statistic), "wilcoxon_p": float(w.pvalue),
    }
    if delta is not None:
        row["tost_p_upper"] = float(stats.ttest_1samp(d, delta, alternative="less").pvalue)
        row["tost_p_lower"] = float(stats.ttest_1samp(d, -delta, alternative="greater").pvalue)
    return row


def holm_by_hand(p):
    m = len(p)
    order = sorted(range(m), key=lambda i: p[i])  # stable: ties keep input order
    adjusted, running = [0.0] * m, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        adjusted[i] = running
    # Interval levels: 1 - alpha / (m - min(i, k*) + 1), k* = Holm's stopping rank.
    alphas, stop = [0.0] * m, None
    for rank0, i in enumerate(order):
        rank = rank0 + 1
        if stop is None and p[i] >= ALPHA / (m - rank + 1):
            stop = rank
        level_rank = rank if stop is None else stop
        alphas[i] = (rank, ALPHA / (m - level_rank + 1))
    return adjusted, alphas


def family(rows, names):
    chosen = [next(r for r in rows if r["name"] == n) for n in names]
    p = [r["p"] for r in chosen]
    adjusted, alphas = holm_by_hand(p)
    w_adjusted, _ = holm_by_hand([r["wilcoxon_p"] for r in chosen])
    out = []
    for r, adj, wadj, (rank, a) in zip(chosen, adjusted, w_adjusted, alphas):
        n = len(r["dpo"])
        ci = stats.t.interval(1 - a, n - 1, loc=r["mean"], scale=r["sd"] / np.sqrt(n))
        out.append({"name": r["name"], "p_holm": adj, "wilcoxon_p_holm": wadj, "rank": rank, "alpha": a,
                    "holm_interval": [float(ci[0]), float(ci[1])]})
    return {"names": names, "measures": out}


def power(d, n):
    df, nc = n - 1, d * np.sqrt(n)
    tc = stats.t.ppf(1 - ALPHA / 2, df)
    # scipy's nct.cdf returns NaN far in the lower tail for df = 1 and large nc (there it is
    # below 1e-15); that tail is then taken as 0.
    lower = stats.nct.cdf(-tc, df, nc)
    return float(stats.nct.sf(tc, df, nc) + (0.0 if np.isnan(lower) else lower))


def main():
    rows = [paired(*c) for c in cases()]
    nct = []
    for t in [-3.0, -0.5, 0.0, 0.7, 2.1, 5.0, 12.7]:
        for df in [1, 2, 7, 30]:
            for nc in [-2.0, 0.0, 0.5, 3.3, 8.0]:
                v = float(stats.nct.cdf(t, df, nc))  # scipy.stats.nct.cdf(t, df, nc)
                if not np.isnan(v):
                    nct.append([t, df, nc, v])
    powers = [[d, n, power(d, n)] for d, n in [(0.48, 3), (0.85, 3), (1.5, 3), (0.48, 36), (1.16, 8), (2.0, 2), (0.3, 50)]]
    detectable = [[n, optimize.brentq(lambda d: power(d, n) - 0.8, 1e-6, 30, xtol=1e-14)] for n in [2, 3, 5, 8, 13, 36]]

    def needed(d):
        n = 2
        while power(d, n) < 0.8:
            n += 1
        return n

    pairs_needed = [[d, needed(d)] for d in [0.48, 0.85, 1.5, 1.16, 3.0, 0.25]]
    v = [0.3, -1.2, 0.5, 2.25, 0.0, 0.7, 1.1]
    percentiles = [[q / 100, float(np.percentile(v, q))] for q in [0, 2.5, 50, 97.5, 100, 37]]
    json.dump({
        "alpha": ALPHA,
        "paired": rows,
        "family": family(rows, ["n8", "n3", "negative", "n2", "normal_n60"]),
        "holm_examples": [[p, holm_by_hand(p)[0], [a for _, a in holm_by_hand(p)[1]]]
                          for p in [[0.03, 0.04], [0.01, 0.04, 0.03, 0.005], [0.2, 0.2, 0.001]]],
        "nct_cdf": nct,
        "power": powers,
        "detectable_d": detectable,
        "pairs_needed": pairs_needed,
        "percentile_values": v,
        "percentiles": percentiles,
        "versions": {"scipy": __import__("scipy").__version__, "numpy": np.__version__},
    }, sys.stdout)


if __name__ == "__main__":
    main()
