"""Reference linear probe: scikit-learn LogisticRegression(solver="lbfgs", max_iter=1000), the
CLIP / PIVOT ImageNet-probe protocol, on the same features `bench_train probe` fits.

    python benches/ref_probe.py make --out out/bench/probe_features.safetensors   # synthetic features
    python benches/ref_probe.py fit --features out/bench/probe_features.safetensors --threads 2
"""

import argparse
import json
import statistics
import time

import numpy as np


def vm_hwm_mib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def make(a):
    """A frozen-feature classification problem shaped like a scaled-down ImageNet probe:
    K Gaussian classes in D dims with a shared anisotropic covariance (features of real encoders
    have a decaying spectrum), so the optimum is neither trivial nor separable."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    k, d = a.classes, a.dim
    spectrum = 1.0 / np.sqrt(1.0 + np.arange(d))  # decaying per-direction scale
    basis, _ = np.linalg.qr(rng.standard_normal((d, d)))
    means = rng.standard_normal((k, d)) * spectrum * a.separation

    def sample(n):
        y = rng.integers(0, k, n)
        z = rng.standard_normal((n, d)) * spectrum
        return ((means[y] + z) @ basis.T).astype(np.float32), y.astype(np.int64)

    xtr, ytr = sample(a.train)
    xte, yte = sample(a.test)
    save_file({"x_train": xtr, "y_train": ytr, "x_test": xte, "y_test": yte}, a.out)
    print(json.dumps({"features": a.out, "train": a.train, "test": a.test, "dim": d, "classes": k}))


def fit(a):
    from safetensors.numpy import load_file
    from threadpoolctl import threadpool_limits
    import sklearn
    from sklearn.linear_model import LogisticRegression

    f = load_file(a.features)
    xtr, ytr, xte, yte = f["x_train"], f["y_train"], f["x_test"], f["y_test"]
    times, clf = [], None
    with threadpool_limits(limits=a.threads if a.threads > 0 else None):
        for _ in range(a.repeats):
            clf = LogisticRegression(solver="lbfgs", max_iter=1000, C=a.c)
            t0 = time.perf_counter()
            clf.fit(xtr, ytr)
            times.append(time.perf_counter() - t0)
    top1 = float((clf.predict(xte) == yte).mean())
    # The objective in our scaling: mean CE + ||W||^2 / (2 C n), evaluated in float64.
    x = xtr.astype(np.float64)
    z = x @ clf.coef_.T.astype(np.float64) + clf.intercept_
    z -= z.max(1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(1, keepdims=True))
    obj = float(-logp[np.arange(len(ytr)), ytr].mean() + (clf.coef_.astype(np.float64) ** 2).sum() / (2 * a.c * len(ytr)))
    res = {
        "side": "reference",
        "task": "probe",
        "threads": a.threads,
        "c": a.c,
        "fits": [
            {
                "name": "sklearn_lbfgs",
                "fit_s": statistics.median(times),
                "top1": top1,
                "iterations": int(np.max(clf.n_iter_)),
                "objective": obj,
                "converged": bool(np.max(clf.n_iter_) < 1000),
                "tolerance_grad": 1e-4,
            }
        ],
        "peak_rss_mib": vm_hwm_mib(),
        "sklearn": sklearn.__version__,
        "numpy": np.__version__,
    }
    text = json.dumps(res)
    if a.json:
        open(a.json, "w").write(text)
    print(text)


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make")
    m.add_argument("--out", required=True)
    m.add_argument("--train", type=int, default=5000)
    m.add_argument("--test", type=int, default=2000)
    m.add_argument("--dim", type=int, default=384)
    m.add_argument("--classes", type=int, default=50)
    m.add_argument("--separation", type=float, default=0.2)
    f = sub.add_parser("fit")
    f.add_argument("--features", required=True)
    f.add_argument("--threads", type=int, default=0)
    f.add_argument("--c", type=float, default=1.0)
    f.add_argument("--repeats", type=int, default=1)
    f.add_argument("--json")
    a = ap.parse_args()
    make(a) if a.cmd == "make" else fit(a)


if __name__ == "__main__":
    main()
