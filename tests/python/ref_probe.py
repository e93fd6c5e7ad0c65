"""Reference numbers for the Rust probe/analysis tests (prelude/tests/probe_*.rs, analysis_*.rs).

Usage: ref_probe.py logreg OUT.safetensors     scikit-learn LogisticRegression on the digits images
       ref_probe.py align  OUT.safetensors     platonic-rep metrics (NumPy transcription) on random features

Writes float64/int64 tensors with the `safetensors` layout by hand (numpy only), so the Rust side
reads them with `Tensor::read_safetensors` and no extra Python package is needed beyond numpy/sklearn.
"""
import json
import struct
import sys
import time

import numpy as np


def write_safetensors(path, tensors):
    dt = {np.dtype("float64"): "F64", np.dtype("int64"): "I64", np.dtype("float32"): "F32"}
    header, blobs, off = {}, [], 0
    for name, arr in tensors.items():
        arr = np.ascontiguousarray(arr)
        b = arr.tobytes()
        header[name] = {"dtype": dt[arr.dtype], "shape": list(arr.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    h = json.dumps(header).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)


def logreg(out):
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression

    x, y = load_digits(return_X_y=True)
    rng = np.random.RandomState(0)
    perm = rng.permutation(len(y))
    x, y = x[perm].astype(np.float64), y[perm].astype(np.int64)
    n_train = 1200
    xtr, ytr, xva, yva = x[:n_train], y[:n_train], x[n_train:], y[n_train:]
    # Same standardisation the Rust LinearProbe applies (train statistics), so both fit identical inputs.
    mu, sd = xtr.mean(0), xtr.std(0)
    sd[sd < 1e-6] = 1.0
    xtr_s, xva_s = (xtr - mu) / sd, (xva - mu) / sd
    out_t = {"x_train": xtr_s, "y_train": ytr, "x_val": xva_s, "y_val": yva}
    for tag, c in (("c0", 0.1), ("c1", 1.0)):
        clf = LogisticRegression(C=c, max_iter=1000)  # lbfgs, multinomial, L2 (sklearn >= 1.5 defaults)
        t0 = time.perf_counter()
        clf.fit(xtr_s, ytr)
        dt = time.perf_counter() - t0
        out_t[f"{tag}_c"] = np.array([c])
        out_t[f"{tag}_pred"] = clf.predict(xva_s).astype(np.int64)
        out_t[f"{tag}_proba"] = clf.predict_proba(xva_s)
        out_t[f"{tag}_coef"] = clf.coef_
        out_t[f"{tag}_intercept"] = clf.intercept_
        out_t[f"{tag}_fit_seconds"] = np.array([dt])
        out_t[f"{tag}_top1"] = np.array([(clf.predict(xva_s) == yva).mean()])
    write_safetensors(out, out_t)


# ---- platonic-rep metrics (metrics.py), transcribed to NumPy in float64 ----
def knn(f, k):
    s = f @ f.T
    np.fill_diagonal(s, -1e8)
    return np.argsort(-s, axis=1, kind="stable")[:, :k]


def mutual_knn(a, b, k):
    n = a.shape[0]
    ma, mb = np.zeros((n, n)), np.zeros((n, n))
    r = np.arange(n)[:, None]
    ma[r, knn(a, k)] = 1
    mb[r, knn(b, k)] = 1
    return ((ma * mb).sum(1) / k).mean()


def hsic_unbiased(K, L):
    m = K.shape[0]
    Kt, Lt = K.copy(), L.copy()
    np.fill_diagonal(Kt, 0)
    np.fill_diagonal(Lt, 0)
    v = (Kt * Lt.T).sum() + Kt.sum() * Lt.sum() / ((m - 1) * (m - 2)) - 2 * (Kt @ Lt).sum() / (m - 2)
    return v / (m * (m - 3))


def hsic_biased(K, L):
    n = K.shape[0]
    H = np.eye(n) - 1.0 / n
    return np.trace(K @ H @ L @ H)


def cka(a, b, unbiased):
    K, L = a @ a.T, b @ b.T
    f = hsic_unbiased if unbiased else hsic_biased
    return f(K, L) / (np.sqrt(f(K, K) * f(L, L)) + 1e-6)


def cknna(a, b, k, unbiased=True):
    n = a.shape[0]
    K, L = a @ a.T, b @ b.T

    def sim(K, L):
        Kh, Lh = K.copy(), L.copy()
        if unbiased:
            np.fill_diagonal(Kh, -np.inf)
            np.fill_diagonal(Lh, -np.inf)
        ik = np.argsort(-Kh, axis=1, kind="stable")[:, :k]
        il = np.argsort(-Lh, axis=1, kind="stable")[:, :k]
        mk, ml = np.zeros((n, n)), np.zeros((n, n))
        r = np.arange(n)[:, None]
        mk[r, ik] = 1
        ml[r, il] = 1
        m = mk * ml
        return (hsic_unbiased if unbiased else hsic_biased)(m * K, m * L)

    return sim(K, L) / (np.sqrt(sim(K, K) * sim(L, L)) + 1e-6)


def remove_outliers(f, q, exact):
    if exact:
        t = np.sort(np.abs(f).reshape(-1))[int(q * f.size)]
    else:
        t = np.quantile(np.abs(f).reshape(f.shape[0], -1), q, axis=1).mean()  # linear, like torch.quantile
    return np.clip(f, -t, t)


def normalize(f):
    return f / np.maximum(np.linalg.norm(f, axis=-1, keepdims=True), 1e-12)


def align(out):
    rng = np.random.RandomState(0)
    n, la, lb, da, db = 96, 3, 2, 48, 40
    # Shared latent so the scores are far from chance and the layer grid has structure.
    z = rng.randn(n, 16)
    a = np.stack([z @ rng.randn(16, da) * (i + 1) + rng.randn(n, da) * (0.5 + i) for i in range(la)], 1)
    b = np.stack([z @ rng.randn(16, db) + rng.randn(n, db) * (1.0 + 2 * j) for j in range(lb)], 1)
    a[3, 0, 5] = 40.0  # an outlier that the clamp must catch
    t = {"a_raw": a, "b_raw": b}
    for exact in (False, True):
        tag = "exact" if exact else "mean"
        pa, pb = normalize(remove_outliers(a, 0.95, exact)), normalize(remove_outliers(b, 0.95, exact))
        t[f"a_prep_{tag}"] = pa
        t[f"b_prep_{tag}"] = pb
    pa, pb = t["a_prep_mean"], t["b_prep_mean"]
    for name, fn in (
        ("mknn", lambda x, y: mutual_knn(x, y, 10)),
        ("cka", lambda x, y: cka(x, y, False)),
        ("ucka", lambda x, y: cka(x, y, True)),
        ("cknna", lambda x, y: cknna(x, y, 10)),
    ):
        t[f"grid_{name}"] = np.array([[fn(pa[:, i], pb[:, j]) for j in range(lb)] for i in range(la)])
    write_safetensors(out, t)


if __name__ == "__main__":
    {"logreg": logreg, "align": align}[sys.argv[1]](sys.argv[2])
