"""Synthetic descriptors shaped like lookalike's real ones, for benchmarking approximate FAISS
indexes at 1 M to 10 M vectors (uniform points on the sphere are meaningless for IVF).

Real descriptors (EfficientNet-Lite0 GeM, 1280-dim, L2-normalised) are non-negative and sparse:
about 30 % of the entries are exactly zero (rectified activations), the mean vector carries
about half of the energy (random pairs have cosine ~0.5) and the rest is strongly low-rank.
The generator therefore works in a *latent* Gaussian space and rectifies:

    z = mu + sd * ( L @ (b * g_cluster + w * g_point) + sqrt(1 - |L_j|^2) * (b' e_cluster + w e_point) )
    x = relu(z) / |relu(z)|

* mu, sd: per-dimension latent mean / sd of a censored Gaussian, fitted so that relu(z) has the
  real per-dimension zero fraction and mean;
* L (d x r, r = 192): low-rank factor of the latent correlation (from the PCA of the real
  descriptors with zeros imputed), scaled by a fitted gain;
* clusters: K = n / mean_cluster_size centres, heavy-tailed (lognormal) weights, b^2 + w^2 = 1 so
  the marginal distribution does not depend on the cluster structure.  Centres live in the r-dim
  factor space (plus a small per-cluster residual seeded by cluster id), so 10 M rows need only
  K x r floats of state.

Rows are produced in fixed internal blocks of ``BLOCK`` rows, each block with its own
``np.random.Generator`` seeded from (seed, n, block index): the output is deterministic for
(n, seed) and independent of ``chunk``.  It does depend on ``n`` (K grows with n), so the first
1 M rows of a 10 M set are not the 1 M set.

    python -m bench.synth [DB ...]     fit on real descriptors, write bench/synth_model.npz,
                                       print the calibration table.
"""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, field, asdict
from pathlib import Path
from typing import Iterator

import numpy as np

BLOCK = 8192
MODEL_PATH = Path(__file__).with_name("synth_model.npz")


# --------------------------------------------------------------------------- model
@dataclass
class Model:
    mu: np.ndarray                 # (d,) latent mean
    sd: np.ndarray                 # (d,) latent sd
    factor: np.ndarray             # (d, r) low-rank factor of the latent correlation (unit-free)
    between: float = 0.6           # b: share (in sd) of the latent variation that is between clusters
    cluster_size: float = 80.0     # mean rows per cluster (clusters per million = 1e6 / this)
    size_sigma: float = 1.0        # lognormal sigma of the cluster weights (heavy tail)
    dup_noise: float = 0.25        # latent noise (in sd units) of near-duplicate queries
    spread_sigma: float = 0.0      # lognormal sigma of the per-cluster within-spread (tight and loose groups)
    meta: dict = field(default_factory=dict)

    @property
    def dim(self) -> int:
        return int(self.mu.shape[0])

    @property
    def rank(self) -> int:
        return int(self.factor.shape[1])

    def save(self, path=MODEL_PATH) -> None:
        np.savez_compressed(
            path, mu=self.mu.astype(np.float32), sd=self.sd.astype(np.float32),
            factor=self.factor.astype(np.float16),
            scalars=np.array([self.between, self.cluster_size, self.size_sigma, self.dup_noise,
                              self.spread_sigma]),
            meta=np.array(json.dumps(self.meta, default=str)))

    @classmethod
    def load(cls, path=MODEL_PATH) -> "Model":
        z = np.load(path)
        b, m, s, dn, ss = (float(v) for v in z["scalars"])
        meta = json.loads(str(z["meta"])) if "meta" in z else {}
        return cls(mu=z["mu"].astype(np.float32), sd=z["sd"].astype(np.float32),
                   factor=z["factor"].astype(np.float32), between=b, cluster_size=m,
                   size_sigma=s, dup_noise=dn, spread_sigma=ss, meta=meta)

    # derived, cached
    def _prep(self):
        if getattr(self, "_cache", None) is None:
            f = self.factor.astype(np.float32)
            res = np.sqrt(np.clip(1.0 - (f * f).sum(1), 1e-4, None)).astype(np.float32)
            # fold sd into the factor: z = mu + (g @ fs.T) + (sd*res) * e
            fs = np.ascontiguousarray((f * self.sd[:, None]).T)            # (r, d)
            self._cache = (fs, (self.sd * res).astype(np.float32), self.mu.astype(np.float32))
        return self._cache


# --------------------------------------------------------------------------- fit
def _phi(t):
    return np.exp(-0.5 * t * t) / math.sqrt(2 * math.pi)


_erf = np.vectorize(math.erf, otypes=[np.float64])


def _Phi(t):
    return 0.5 * (1.0 + _erf(t / math.sqrt(2.0)))


def _moments(mean: np.ndarray, m2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Latent (m, s) per dim such that relu(N(m, s^2)) has first and second moments (mean, m2)."""
    target = np.clip(m2 / np.maximum(mean, 1e-12) ** 2, 1.02, 200.0)
    lo, hi = np.full_like(mean, -4.0), np.full_like(mean, 6.0)
    for _ in range(60):                       # R(t) = E[x^2]/E[x]^2 decreases with t = m/s
        t = 0.5 * (lo + hi)
        P, f = _Phi(t), _phi(t)
        R = ((t * t + 1) * P + t * f) / (t * P + f) ** 2
        hi = np.where(R < target, t, hi)
        lo = np.where(R < target, lo, t)
    t = 0.5 * (lo + hi)
    s = mean / (t * _Phi(t) + _phi(t))
    return t * s, s


def fit_latent(real: np.ndarray, rank: int = 192) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    real = np.asarray(real, np.float64)
    zero = real < 1e-6
    mean, m2 = real.mean(0), (real * real).mean(0)
    mu, sd = _moments(mean, m2)
    # impute zeros by E[z | z < 0] and standardise -> correlation, low-rank part
    t = mu / sd
    cond = mu - sd * _phi(t) / np.maximum(_Phi(-t), 1e-12)
    z = np.where(zero, cond[None, :], real)
    zs = (z - mu) / sd
    zs -= zs.mean(0)
    zs /= zs.std(0) + 1e-9
    c = zs.T @ zs / len(zs)
    ev, vec = np.linalg.eigh(c)
    ev, vec = ev[::-1][:rank], vec[:, ::-1][:, :rank]
    factor = vec * np.sqrt(np.clip(ev, 0, None))
    return mu.astype(np.float32), sd.astype(np.float32), factor.astype(np.float32)


def _recalibrate(model: "Model", real: np.ndarray, iters: int = 4, n: int = 16384) -> "Model":
    """Adjust the latent marginals so that the *normalised* synthetic rows have the real per-dim
    first and second moments (row normalisation shifts them)."""
    mean_r = real.mean(0).astype(np.float64)
    m2_r = (real.astype(np.float64) ** 2).mean(0)
    tm, tm2 = mean_r.copy(), m2_r.copy()
    for _ in range(iters):
        y = generate(n, model=model, seed=12345).astype(np.float64)
        ms, m2s = y.mean(0), (y * y).mean(0)
        tm *= np.clip(mean_r / np.maximum(ms, 1e-9), 0.5, 2.0)
        tm2 *= np.clip(m2_r / np.maximum(m2s, 1e-12), 0.25, 4.0)
        mu, sd = _moments(tm, tm2)
        model.mu, model.sd = mu.astype(np.float32), sd.astype(np.float32)
        model._cache = None
    return model


def _with_gain(factor: np.ndarray, gain: float) -> np.ndarray:
    f = factor * gain
    rs = np.sqrt((f * f).sum(1, keepdims=True))
    return f / np.maximum(rs / 0.995, 1.0)          # keep each row's explained share < 1


# --------------------------------------------------------------------------- generation
def _clusters(model: Model, n: int, seed: int):
    K = max(1, int(round(n / model.cluster_size)))
    rng = np.random.default_rng([seed, n, 0xC1])
    w = rng.lognormal(0.0, model.size_sigma, K)
    cdf = np.cumsum(w)
    cdf /= cdf[-1]
    centres = rng.standard_normal((K, model.rank), dtype=np.float32) * np.float32(model.between)
    ss = model.spread_sigma
    spread = np.exp(ss * rng.standard_normal(K) - ss * ss / 2).astype(np.float32)
    return K, cdf, centres, spread


def _cluster_residual(model: Model, ids: np.ndarray, seed: int, n: int) -> np.ndarray:
    """Per-cluster isotropic residual centre component, derived from a hash of the cluster id
    (so it need not be stored): a fixed pool of residual vectors indexed by a hash of the id."""
    pool = _residual_pool(model, seed, n)
    h = (ids.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(64 - 12)
    return pool[h.astype(np.int64)]


_POOLS: dict = {}


def _residual_pool(model: Model, seed: int, n: int) -> np.ndarray:
    key = (id(model), seed, n)
    if key not in _POOLS:
        rng = np.random.default_rng([seed, n, 0xE5])
        _POOLS.clear()
        _POOLS[key] = rng.standard_normal((4096, model.dim), dtype=np.float32) * np.float32(model.between)
    return _POOLS[key]


def _block_latent(model: Model, n: int, seed: int, b: int, clusters, stream: int = 0,
                  rows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Latent z for block b (rows b*BLOCK ...); returns (z, labels)."""
    K, cdf, centres, spread = clusters
    fs, rsd, mu = model._prep()
    m = min(BLOCK, n - b * BLOCK) if rows is None else rows
    rng = np.random.default_rng([seed, n, b, stream])
    lab = np.searchsorted(cdf, rng.random(m), side="right").clip(0, K - 1)
    w = np.float32(math.sqrt(max(1.0 - model.between ** 2, 0.0))) * spread[lab][:, None]
    g = centres[lab] + w * rng.standard_normal((m, model.rank), dtype=np.float32)
    z = g @ fs
    e = rng.standard_normal((m, model.dim), dtype=np.float32)
    e *= w
    e += _cluster_residual(model, lab, seed, n)
    e *= rsd
    z += e
    z += mu
    return z, lab


def _rectify(z: np.ndarray) -> np.ndarray:
    np.maximum(z, 0, out=z)
    nrm = np.sqrt(np.einsum("ij,ij->i", z, z))
    z /= np.maximum(nrm, 1e-12)[:, None]
    return z


def _model(model):
    return model if model is not None else Model.load()


def descriptors(n: int, *, dim: int = 1280, seed: int = 0, chunk: int = 100_000,
                model: Model | None = None) -> Iterator[np.ndarray]:
    """Yield float32 chunks (rows of unit norm) totalling n rows; deterministic for (n, seed),
    independent of chunk."""
    model = _model(model)
    if dim != model.dim:
        raise ValueError(f"model is {model.dim}-dim, asked for {dim}")
    cl = _clusters(model, n, seed)
    cur_b, cur = -1, None
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        out = np.empty((stop - start, model.dim), np.float32)
        pos = start
        while pos < stop:
            b = pos // BLOCK
            if b != cur_b:
                cur_b, cur = b, _rectify(_block_latent(model, n, seed, b, cl)[0])
            lo = pos - b * BLOCK
            k = min(len(cur) - lo, stop - pos)
            out[pos - start:pos - start + k] = cur[lo:lo + k]
            pos += k
        yield out


def generate(n: int, **kw) -> np.ndarray:
    return np.concatenate(list(descriptors(n, **kw)))


def queries(n: int, *, base_n: int, seed: int = 0, near_dup: float = 0.5,
            model: Model | None = None, dup_noise: float | None = None
            ) -> tuple[np.ndarray, np.ndarray]:
    """Held-out queries for the set ``descriptors(base_n, seed=seed)``.

    A share ``near_dup`` are perturbed copies of base rows (the latent vector of the row plus
    Gaussian noise of ``dup_noise`` latent sd, then rectified: a re-encoded / recropped photo),
    the rest are fresh draws from the same mixture (new photos of the same groups).
    Returns (q float32 n x d, source base row or -1 for fresh points)."""
    model = _model(model)
    dn = model.dup_noise if dup_noise is None else dup_noise
    cl = _clusters(model, base_n, seed)
    rng = np.random.default_rng([seed, base_n, 0x0E])
    nd = int(round(n * near_dup))
    nb = (base_n + BLOCK - 1) // BLOCK
    # near duplicates: pick rows from a few random blocks (rows are iid across blocks)
    src = np.full(n, -1, np.int64)
    out = []
    if nd:
        blocks = rng.choice(nb, size=min(nb, max(1, -(-nd // 512))), replace=False)
        per = -(-nd // len(blocks))
        got = 0
        for b in blocks:
            z, _ = _block_latent(model, base_n, seed, int(b), cl)
            k = min(per, nd - got, len(z))
            r = np.sort(rng.choice(len(z), k, replace=False))
            zz = z[r] + dn * model.sd * rng.standard_normal((k, model.dim), dtype=np.float32)
            out.append(_rectify(zz.astype(np.float32)))
            src[got:got + k] = int(b) * BLOCK + r
            got += k
    if n - nd:
        z, _ = _block_latent(model, base_n, seed, 0, cl, stream=1 + int(rng.integers(1 << 30)),
                             rows=n - nd)
        out.append(_rectify(z))
    return np.concatenate(out).astype(np.float32), src


# --------------------------------------------------------------------------- statistics
def stats(x: np.ndarray, *, seed: int = 0, nq: int = 1000, ivf: bool = True) -> dict:
    """Calibration statistics of unit-norm rows x."""
    import faiss
    x = np.ascontiguousarray(x, np.float32)
    n, d = x.shape
    rng = np.random.default_rng(seed)
    out: dict = {"n": n}
    i, j = rng.integers(0, n, (2, 200_000))
    keep = i != j
    out["cos_rand"] = float(np.einsum("ij,ij->i", x[i[keep]], x[j[keep]]).mean())
    out["zero_frac"] = float((x[: min(n, 20000)] < 1e-6).mean())
    q = rng.choice(n, min(nq, n), replace=False)
    flat = faiss.IndexFlatIP(d)
    flat.add(x)
    D, I = flat.search(x[q], 11)
    # drop self (first column is self for distinct rows)
    D = D[:, 1:]
    for k, col in (("nn1", 0), ("nn10", 9)):
        v = D[:, col]
        out[k] = tuple(float(a) for a in np.quantile(v, [0.5, 0.1, 0.9]))
    s = x[rng.choice(n, min(n, 20000), replace=False)].astype(np.float64)
    s -= s.mean(0)
    ev = np.linalg.eigvalsh(s.T @ s)[::-1]
    for k in (16, 64, 256):
        out[f"pca{k}"] = float(ev[:k].sum() / ev.sum())
    if ivf:
        nlist = max(2, int(round(4 * math.sqrt(n))))
        km = faiss.Kmeans(d, nlist, niter=20, seed=seed + 1, verbose=False,
                          max_points_per_centroid=256)
        km.train(x)
        ix = faiss.IndexFlatL2(d)
        ix.add(km.centroids)
        _, a = ix.search(x, 1)
        cnt = np.bincount(a[:, 0], minlength=nlist).astype(np.float64)
        out["nlist"] = nlist
        out["imbalance"] = float((cnt ** 2).sum() * nlist / n ** 2)
        out["km_mse"] = float(km.obj[-1] / n)
        ivfi = faiss.IndexIVFFlat(ix, d, nlist, faiss.METRIC_INNER_PRODUCT)
        ivfi.is_trained = True
        ivfi.add(x)
        gt = I[:, 1:11]
        for p in (1, 4, 16):
            ivfi.nprobe = p
            _, Ii = ivfi.search(x[q], 11)
            rec = [len(set(gt[t]) & (set(Ii[t]) - {q[t]})) / 10 for t in range(len(q))]
            out[f"R@10/np{p}"] = float(np.mean(rec))
    return out


def fmt_table(cols: dict[str, dict]) -> str:
    keys = ["n", "cos_rand", "zero_frac", "nn1", "nn10", "pca16", "pca64", "pca256", "nlist",
            "imbalance", "km_mse", "R@10/np1", "R@10/np4", "R@10/np16"]
    names = list(cols)
    lines = ["| stat | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for k in keys:
        row = []
        for nm in names:
            v = cols[nm].get(k, "")
            if isinstance(v, tuple):
                row.append("%.3f (%.3f-%.3f)" % v)
            elif isinstance(v, float):
                row.append("%.3f" % v)
            else:
                row.append(str(v))
        lines.append(f"| {k} | " + " | ".join(row) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- fit scalars
def _loss(r: dict, s: dict) -> float:
    l = 0.0
    l += (r["cos_rand"] - s["cos_rand"]) ** 2 / 0.04 ** 2      # noisy at small n
    for k in ("nn1", "nn10"):
        l += (r[k][0] - s[k][0]) ** 2 / 0.02 ** 2
        l += 0.5 * ((r[k][1] - s[k][1]) ** 2 + (r[k][2] - s[k][2]) ** 2) / 0.03 ** 2
    for k in ("pca16", "pca64", "pca256"):
        l += (r[k] - s[k]) ** 2 / 0.03 ** 2
    if "imbalance" in r and "imbalance" in s:
        l += (r["imbalance"] - s["imbalance"]) ** 2 / 0.15 ** 2
        for p in (1, 4, 16):
            l += (r[f"R@10/np{p}"] - s[f"R@10/np{p}"]) ** 2 / 0.04 ** 2
    return l


def fit(real: np.ndarray, *, rank: int = 192, verbose: bool = True, grid: dict | None = None,
        dup_cos: float = 0.92) -> Model:
    """Fit the latent marginals and correlation, then the scalars (correlation gain, between
    share, cluster size, per-cluster spread) by a small grid search matching stats() at
    n = len(real); dup_noise is set so near-duplicate queries have median cosine ``dup_cos``
    to their source."""
    real = np.ascontiguousarray(real, np.float32)
    n = len(real)
    mu, sd, factor0 = fit_latent(real, rank)
    target = stats(real)
    grid = grid or dict(gain=[0.9, 1.0], b=[0.75, 0.8], m=[25, 40], ss=[0.0, 0.25])
    best = None
    for gain in grid["gain"]:
        for b in grid["b"]:
            for m in grid["m"]:
                for ss in grid["ss"]:
                    md = Model(mu.copy(), sd.copy(), _with_gain(factor0, gain), between=b,
                               cluster_size=m, spread_sigma=ss)
                    _recalibrate(md, real)
                    st = stats(generate(n, model=md, seed=0))
                    l = _loss(target, st)
                    if verbose:
                        print(f"gain={gain} b={b} m={m} ss={ss} loss={l:.1f} nn1={st['nn1'][0]:.3f} "
                              f"nn10={st['nn10'][0]:.3f} pca={st['pca16']:.2f}/{st['pca64']:.2f}/"
                              f"{st['pca256']:.2f} imb={st['imbalance']:.2f} R@10={st['R@10/np1']:.2f}/"
                              f"{st['R@10/np4']:.2f}/{st['R@10/np16']:.2f}", flush=True)
                    if best is None or l < best[0]:
                        best = (l, md, gain)
    _, md, gain = best
    md.meta = dict(n_fit=n, gain=gain, rank=rank, loss=round(best[0], 1))
    # near-duplicate noise: bisection on the median cosine query-source
    base = generate(min(n, BLOCK), model=md, seed=7)
    lo, hi = 0.0, 2.0
    for _ in range(12):
        md.dup_noise = 0.5 * (lo + hi)
        q, src = queries(400, base_n=min(n, BLOCK), seed=7, near_dup=1.0, model=md)
        c = float(np.median(np.einsum("ij,ij->i", q, base[src])))
        lo, hi = (md.dup_noise, hi) if c > dup_cos else (lo, md.dup_noise)
    md.meta["dup_cos"] = dup_cos
    return md


def load_real(dbs) -> dict[str, np.ndarray]:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from indexer.store import Store
    out = {}
    for db in dbs:
        out[Path(db).stem] = np.concatenate([v for _, v in Store(db).embeddings()])
    return out


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0].endswith(".npz"):
        z = np.load(argv[0])
        sets = {k: z[k] for k in z.files}
    else:
        sets = load_real(argv or [f"/tmp/synth/{s}.db" for s in ("corel1k", "paris250", "flowers12")])
    real = np.concatenate(list(sets.values())).astype(np.float32)
    print("real:", {k: len(v) for k, v in sets.items()}, real.shape)
    model = fit(real)
    model.save(MODEL_PATH)
    print("saved", MODEL_PATH, MODEL_PATH.stat().st_size, "bytes", model.meta,
          dict(between=model.between, cluster_size=model.cluster_size, size_sigma=model.size_sigma))
    n = len(real)
    cols = {"real": stats(real), "synth": stats(generate(n, model=model, seed=0))}
    print(fmt_table(cols))
    t = time.time()
    tot = sum(len(c) for c in descriptors(200_000, model=model, seed=1))
    print(f"generate: {tot / (time.time() - t):,.0f} rows/s")


if __name__ == "__main__":
    main()
