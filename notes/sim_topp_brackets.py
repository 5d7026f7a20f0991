"""Survivors left by the two-level histogram brackets of the split top-p kernel, simulated
in numpy on synthetic logit rows (32k and 128k items; Gaussian, Laplace, flat, sink-heavy,
tied): per setting (coarse bins, fine bins, exact top bins) the items left in the coarse
bracket and in the fine one. Used to choose NB1=128, NB2=64 and the exact top bins
(notes/selection_kernels.md). Run: python3 notes/sim_topp_brackets.py"""
import numpy as np, math
rng = np.random.default_rng(0)
M = 1e-5
def bracket(cnt, mass_exact, E, up, lo, base, pz):
    # bins < E: exact mass; others bounds
    mhi = np.where(np.arange(len(cnt)) < E, mass_exact*(1+M), cnt*up)
    mlo = np.where(np.arange(len(cnt)) < E, mass_exact*(1-M), cnt*lo)
    Ahi = base + np.cumsum(mhi); Alo = base + np.cumsum(mlo)
    c1 = Ahi >= pz*(1-M); c2 = Alo >= pz*(1+M)
    bf = int(np.argmax(c1)) if c1.any() else len(cnt)-1
    bl = int(np.argmax(c2)) if c2.any() else len(cnt)-1
    return bf, bl
def run(l, p, NB1, NB2, E):
    m = l.max(); w = np.exp(l - m); Z = w.sum(); n = len(l); pz = p*Z
    lo0 = (1-p)*Z/n*(1-1e-5); l0 = m + math.log(lo0) - 1e-3
    s = NB1/(m - l0); d = (m - l)*s; live = l >= l0
    b = np.clip(np.floor(d), 0, NB1-1).astype(int)
    cnt = np.bincount(b[live], minlength=NB1); mass = np.bincount(b[live], weights=w[live], minlength=NB1)
    ar = np.arange(NB1)
    bf, bl = bracket(cnt, mass, E, np.exp(-ar/s)*(1+M), np.exp(-(ar+1)/s)*(1-M), 0, pz)
    s1 = cnt[bf:bl+1].sum()
    above = w[live & (b < bf)].sum()
    inb = live & (b >= bf) & (b <= bl)
    d0, d1 = bf, bl + 1
    s2 = NB2/(d1 - d0)
    b2 = np.clip(np.floor((d - d0)*s2), 0, NB2-1).astype(int)
    cnt2 = np.bincount(b2[inb], minlength=NB2); mass2 = np.bincount(b2[inb], weights=w[inb], minlength=NB2)
    a2 = np.arange(NB2)
    up2 = np.exp(-(d0 + a2/s2)/s)*(1+M); lo2 = np.exp(-(d0 + (a2+1)/s2)/s)*(1-M)
    f, g = bracket(cnt2, mass2, E, up2, lo2, above, pz)
    return int(s1), int(cnt2[f:g+1].sum())
worst = {}
for n in (32768, 131072):
  for name, gen in [("gauss1", lambda: rng.normal(0,1,n)), ("gauss2", lambda: rng.normal(0,2,n)),
                    ("gauss3", lambda: rng.normal(0,3,n)),
                    ("flat", lambda: rng.uniform(0,0.5,n)), ("lap2", lambda: rng.laplace(0,2,n)),
                    ("sink+g1", lambda: np.concatenate([[12.0], rng.normal(0,1,n-1)])),
                    ("sink+g2", lambda: np.concatenate([[15.0]*4, rng.normal(0,2,n-4)])),
                    ("sinks+g1", lambda: np.concatenate([rng.normal(10,1,64), rng.normal(0,1,n-64)])),
                    ("ties", lambda: np.round(rng.normal(0,1,n)*4)/4)]:
    l = gen()
    for p in (0.5, 0.9, 0.95, 0.99, 0.999):
      r = [run(l, p, a, b, e) for a, b, e in ((64, 64, 0), (64, 64, 8), (64, 64, 4), (32, 32, 8), (128, 64, 8))]
      print(n, name, p, r)
