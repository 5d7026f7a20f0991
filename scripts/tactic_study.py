"""Tactic's kept mass against p and oracle top-p, per layer and head, on the bundled model.

``capture``: dense greedy decoding of a few eval samples; at each of the first ``--steps``
decode steps every layer's query ``[1, Hq, d]`` and key cache ``[1, Hkv, N, d]``
(post-RoPE) are recorded. ``facts``: per (sample, step, sparse layer), each cluster's
exact mass per query head, centroid scores and spreads (with ``--outliers`` singleton
clusters). ``sweep``: variants of the estimate emulated on those facts (exact kept mass,
kept fraction). ``method``: the method itself (``tactic.select``) on the captured steps.
Commands and results: ``results/eval/tactic_fix_cpu.md``.

    PYTHONPATH=src python scripts/tactic_study.py capture --out /tmp/tactic_cap.pt
    PYTHONPATH=src python scripts/tactic_study.py facts --outliers 0.03 --out /tmp/facts.pt
    PYTHONPATH=src python scripts/tactic_study.py sweep --facts /tmp/facts.pt
    PYTHONPATH=src python scripts/tactic_study.py method --specs tactic:p=0.9
"""

from __future__ import annotations

import argparse
import time

import torch


def capture(args: argparse.Namespace) -> None:
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    from nucleus_attn.eval.runner import generate_from, prefill
    from nucleus_attn.eval.tasks import make_samples
    from nucleus_attn.models import load_model

    torch.set_num_threads(args.threads)
    model, tok = load_model()
    rec: list[dict] = []

    def fn(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kw):
        if query.shape[2] == 1:
            rec.append({"layer": module.layer_idx, "q": query[:, :, 0].clone(),
                        "n": key.shape[2], "scale": scaling})
            if module.layer_idx not in keys or keys[module.layer_idx].shape[2] < key.shape[2]:
                keys[module.layer_idx] = key.clone()
        return sdpa_attention_forward(module, query, key, value, attention_mask,
                                      dropout=dropout, scaling=scaling, **kw)

    AttentionInterface.register("capture", fn)
    AttentionMaskInterface.register("capture", sdpa_mask)
    model.set_attn_implementation("capture")
    out = []
    for task in args.tasks:
        for s in make_samples(task, args.samples, args.length, tok, seed=0):
            keys: dict[int, torch.Tensor] = {}
            rec.clear()
            enc = tok([s.prompt], return_tensors="pt")
            t0 = time.perf_counter()
            cache = prefill(model, enc["input_ids"], enc["attention_mask"])
            t1 = time.perf_counter()
            gen = generate_from(model, cache, enc["input_ids"], enc["attention_mask"],
                                args.steps, None)
            text = tok.decode(gen[0], skip_special_tokens=True)
            print(f"{task}#{s.index}: N={enc['input_ids'].shape[1]} prefill {t1 - t0:.1f}s "
                  f"decode {time.perf_counter() - t1:.1f}s answer={s.answer!r} "
                  f"got={text!r}", flush=True)
            out.append({"task": task, "index": s.index,
                        "keys": {i: k.half() for i, k in keys.items()},
                        "steps": [dict(r, q=r["q"].float()) for r in rec]})
    torch.save(out, args.out)


# --- analysis ------------------------------------------------------------------------------

def layer_facts(q, k, state, n_clustered, cfg, scale):
    """Per query head exact quantities of one (step, layer), per cluster (index order).

    q [1, Hq, d], k [1, Hkv, n, d] float32. Masses are in units of exp(l - max logit)."""
    from nucleus_attn import ops

    _, hq, d = q.shape
    hkv, n = k.shape[1], k.shape[2]
    g = hq // hkv
    c = state.sizes.shape[-1]
    l = torch.einsum("bhgd,bhnd->bhgn", q.view(1, hkv, g, -1), k).reshape(1, hq, n) * scale
    lmax = l.amax(-1, keepdim=True)
    w = torch.exp(l - lmax)[0].double()  # [Hq, n]
    pos = torch.arange(n)
    labels = state.labels[0, :, :n]  # [Hkv, n]
    fixed = (pos < cfg.sink) | (pos >= n - cfg.window) | (pos >= n_clustered)
    fixed = fixed[None, :] | (labels < 0)  # [Hkv, n]
    cs = ops.centroid_scores(q, state.centroids, state.sizes, scale, impl="torch")
    lab = labels.clamp(min=0)
    wq = w.view(hkv, g, n)
    wc = torch.zeros(hkv, g, c, dtype=torch.float64)
    wc.scatter_add_(2, lab[:, None, :].expand(hkv, g, n), torch.where(fixed[:, None], 0.0, wq))
    wall = torch.zeros(hkv, g, c, dtype=torch.float64)
    wall.scatter_add_(2, lab[:, None, :].expand(hkv, g, n),
                      torch.where((labels >= 0)[:, None], wq, 0.0))
    nfix_c = torch.zeros(hkv, c, dtype=torch.float64).scatter_add_(
        1, lab, (fixed & (labels >= 0)).double())
    # spread of each cluster's keys around its centroid (what q.centroid cannot see)
    kc = k[0, :, :n_clustered]
    res = kc - state.centroids[0].float().gather(1, lab[:, :n_clustered, None].expand_as(kc))
    r2 = torch.where(labels[:, :n_clustered] >= 0, (res * res).sum(-1), 0.0).double()
    sig2 = torch.zeros(hkv, c, dtype=torch.float64).scatter_add_(1, lab[:, :n_clustered], r2)
    sig2 = sig2 / state.sizes[0].double().clamp(min=1)
    rmax = torch.zeros(hkv, c, dtype=torch.float64).scatter_reduce_(
        1, lab[:, :n_clustered], r2, "amax").sqrt()
    return {
        "w": wq,  # [Hkv, g, n] exp(l - max)
        "fixed": fixed,  # [Hkv, n]
        "size": state.sizes[0].double(),  # [Hkv, C] members (incl. fixed)
        "nfix": nfix_c,  # [Hkv, C] fixed members
        "W": wc,  # [Hkv, g, C] non-fixed mass
        "Wall": wall,  # [Hkv, g, C] all members' mass
        "s": (cs[0] - lmax[0]).view(hkv, g, c).double(),  # centroid logit - max logit
        "cs": cs[0].view(hkv, g, c).double(),  # centroid logits
        "qn2": (q[0].double().norm(dim=-1) ** 2 * scale**2).view(hkv, g),
        "sig2": sig2, "rmax": rmax, "d": d,
        "e_fixed": torch.where(fixed[:, None], wq, 0.0).sum(-1),  # [Hkv, g]
        "Z": wq.sum(-1),  # [Hkv, g]
        "n": n,
    }


def ranked(f, rank="centroid"):
    """The facts in each KV head's rank order under a ranking rule: ``centroid`` (q.c, the
    paper), ``lognormal`` (q.c + |q|^2 sigma^2 / 2d: the mean weight of a Gaussian cluster),
    ``bound:<alpha>`` (q.c + alpha |q| r_max)."""
    s = f["cs"]
    if rank == "lognormal":
        s = s + f["qn2"][..., None] * f["sig2"][:, None, :] / (2 * f["d"])
    elif rank.startswith("bound:"):
        s = s + float(rank.split(":")[1]) * f["qn2"].sqrt()[..., None] * f["rmax"][:, None, :]
    elif rank != "centroid":
        raise ValueError(rank)
    s = torch.where(f["size"][:, None, :] > 0, s, float("-inf"))
    lse = torch.logsumexp(s, -1, keepdim=True)
    agg = (s - lse).amax(1)  # [Hkv, C] group log-softmax max
    order = torch.argsort(agg, dim=-1, descending=True)
    hkv, g, c = f["W"].shape
    og = order[:, None, :].expand(hkv, g, c)
    out = dict(f)
    out.update(order=order, size_r=f["size"].gather(1, order), nfix_r=f["nfix"].gather(1, order),
               W_r=f["W"].gather(2, og), Wall_r=f["Wall"].gather(2, og),
               s_r=f["s"].gather(2, og))
    return out


def outcome(f, prefix):
    """Exact kept mass per query head and kept tokens per KV head for a ranked prefix."""
    c = f["size_r"].shape[-1]
    take = (torch.arange(c)[None, :] < prefix[:, None]).double()  # [Hkv, C]
    mass = (f["e_fixed"] + (f["W_r"] * take[:, None]).sum(-1)) / f["Z"]
    kept = f["fixed"].sum(-1).double() + ((f["size_r"] - f["nfix_r"]) * take).sum(-1)
    return mass, kept / f["n"]


def prefix_for(f, est, p):
    """Shortest prefix whose fixed + estimated mass reaches p of the estimated total, per
    query head; the KV head keeps the group's longest."""
    z = f["e_fixed"] + est.sum(-1)
    before = f["e_fixed"][..., None] + torch.cumsum(est, -1) - est
    need = (before < p * z[..., None]).sum(-1)  # [Hkv, g]
    return need.amax(-1), z


def oracle_topp(f, p):
    w = f["w"]  # [Hkv, g, n]
    s, idx = w.sort(-1, descending=True)
    cs = s.cumsum(-1)
    need = (cs - s < p * f["Z"][..., None])  # tokens needed per head
    mask = torch.zeros_like(w, dtype=torch.bool).scatter_(-1, idx, need)
    union = mask.any(1)  # [Hkv, n]
    mass = (w * union[:, None]).sum(-1) / f["Z"]
    return mass, union.double().mean(-1)


def curve_sum(a, b, x):
    """``sum_{t=1}^{x} max(a/t + b, 0)`` in float64 (the paper's curve)."""
    t0 = torch.where(b < 0, a / (-b).clamp(min=1e-300), torch.full_like(a, float("inf")))
    xe = torch.minimum(x, torch.floor(t0).clamp(min=0))
    return a * (torch.special.digamma(xe + 1.0) + 0.5772156649015329) + b * xe


def estimate(f, cfg, variant):
    """Estimated mass per ranked cluster [Hkv, g, C] under a variant (see VARIANTS), using
    only what the method scores exactly (head clusters, sampled segments)."""
    size_r = f["size_r"]
    cum = size_r.cumsum(-1)
    before = cum - size_r
    total = cum[..., -1:]
    ef = variant.get("exact_fraction", cfg.exact_fraction)
    head_tokens = torch.ceil(ef * total).clamp(min=1)
    n_head = (before < head_tokens).sum(-1, keepdim=True)  # [Hkv, 1]
    c = size_r.shape[-1]
    ranks = torch.arange(c)[None, :]
    in_head = ranks < n_head
    T = variant.get("sample_tokens", cfg.sample_tokens)
    positions = variant.get("positions", cfg.sample_positions)
    segs = []
    for frac in positions:
        x0 = torch.floor(frac * total)
        segs.append((cum > x0) & (before < x0 + T))
    xs, ys = [], []
    for s in segs:
        ntok = (size_r * s).sum(-1, keepdim=True).clamp(min=1)  # [Hkv, 1]
        ys.append((f["Wall_r"] * s[:, None]).sum(-1) / ntok)  # [Hkv, g]
        lo = torch.where(s, before, torch.full_like(before, float("inf"))).amin(-1, keepdim=True)
        hi = torch.where(s, cum, torch.zeros_like(cum)).amax(-1, keepdim=True)
        xs.append(((lo + hi) / 2 + 0.5).clamp(min=1).expand_as(ys[-1]))
    fit = variant.get("fit", "curve")
    cum_g, before_g = cum[:, None, :], before[:, None, :]
    bound = size_r[:, None, :] * torch.exp(f["s_r"])  # Jensen: a lower bound of the mass
    if variant.get("rank") == "lognormal" or variant.get("lognormal_est"):
        sig2_r = f["sig2"].gather(1, f["order"])
        lnest = bound * torch.exp(f["qn2"][..., None] * sig2_r[:, None, :] / (2 * f["d"]))
    else:
        lnest = bound
    sampled = in_head | segs[0] | segs[1]
    if fit == "curve":
        (y1, y2), (x1, x2) = ys[:2], xs[:2]
        a = ((y1 - y2) / (1 / x1 - 1 / x2).clamp(min=1e-12)).clamp(min=0)
        b = torch.where(a > 0, y1 - a / x1, (y1 + y2) / 2)
        fitted = (curve_sum(a[..., None], b[..., None], cum_g)
                  - curve_sum(a[..., None], b[..., None], before_g))
    elif fit == "centroid":  # calibrated centroid bound: kappa from the sampled clusters
        ex = (f["Wall_r"] * sampled[:, None]).sum(-1)
        bd = (bound * sampled[:, None]).sum(-1)
        fitted = bound * (ex / bd.clamp(min=1e-300))[..., None]
    elif fit == "lognormal":  # per-cluster lognormal estimate, no curve
        fitted = lnest
    elif fit == "lognormal-cal":  # calibrated on the sampled segments
        segm = segs[0] | segs[1]
        ex = (f["Wall_r"] * segm[:, None]).sum(-1)
        bd = (lnest * segm[:, None]).sum(-1)
        fitted = lnest * (ex / bd.clamp(min=1e-300))[..., None]
    else:
        raise ValueError(fit)
    fitted = fitted * variant.get("inflate", 1.0)
    if variant.get("floor") == "jensen":
        fitted = torch.maximum(fitted, bound)
    elif variant.get("floor") == "lognormal":
        fitted = torch.maximum(fitted, lnest)
    exact = f["W_r"]
    est = torch.where(in_head[:, None, :], exact, fitted)
    info = {"n_head": n_head, "segs": segs, "ys": ys, "xs": xs, "fitted": fitted,
            "in_head": in_head}
    return est, info


def build_state(k, n_first, cfg, outliers=0.0):
    """Clusters of ``k[:, :, :n_first]`` (K-means as in ``ClusterState.build``); with
    ``outliers > 0`` the ``outliers * n_first`` keys farthest from their centroid become
    singleton clusters (their centroid is the key, so their score is exact)."""
    import types

    from nucleus_attn import ops
    from nucleus_attn.span import KeySpan

    n = k.shape[2]
    span = KeySpan.full(1, n_first)
    cents, labels, sizes = ops.kmeans(k[:, :, :n_first], span, cfg.cluster_size,
                                      cfg.iterations, cfg.segment)
    if outliers > 0:
        hkv = k.shape[1]
        kf = k[:, :, :n_first]
        lab = labels.clamp(min=0)
        dist = (kf - cents.gather(2, lab[..., None].expand_as(kf))).norm(dim=-1)
        dist = torch.where(labels >= 0, dist, torch.full_like(dist, -1.0))
        m = max(1, int(outliers * n_first))
        top = dist.topk(m, dim=-1).indices
        c0 = sizes.shape[-1]
        old = labels.gather(2, top)
        sizes = sizes.scatter_add(2, old, -torch.ones_like(old))
        labels = labels.scatter(2, top, c0 + torch.arange(m).expand(1, hkv, m))
        sizes = torch.cat([sizes, torch.ones(1, hkv, m, dtype=sizes.dtype)], -1)
        c = sizes.shape[-1]
        sums = torch.zeros(1, hkv, c, kf.shape[-1]).scatter_add_(
            2, labels.clamp(min=0)[..., None].expand_as(kf), kf * (labels >= 0)[..., None])
        pad = torch.cat([cents, torch.zeros(1, hkv, m, cents.shape[-1])], 2)
        cents = torch.where(sizes[..., None] > 0, sums / sizes.clamp(min=1)[..., None], pad)
    labels = torch.cat([labels, torch.full((1, k.shape[1], n - n_first), -1)], -1)
    return types.SimpleNamespace(labels=labels, sizes=sizes, centroids=cents)


def facts(args: argparse.Namespace) -> None:
    """Cluster-level facts of every (sample, step, sparse layer), saved for variant sweeps."""
    import nucleus_attn as na

    torch.set_num_threads(args.threads)
    data = torch.load(args.cap)
    cfg = na.make_config("tactic")
    out = []
    for sample in data:
        n_first = min(r["n"] for r in sample["steps"])
        states = {li: build_state(kk.float(), n_first, cfg, args.outliers)
                  for li, kk in sample["keys"].items() if li >= 2}
        for r in sample["steps"]:
            li = r["layer"]
            if li < 2:
                continue
            k = sample["keys"][li][:, :, :r["n"]].float()
            f = layer_facts(r["q"], k, states[li], n_first, cfg, r["scale"])
            f.update(layer=li, task=sample["task"], index=sample["index"])
            w = f.pop("w")
            f["oracle"] = oracle_topp({"w": w, "Z": f["Z"]}, 0.9)
            out.append(f)
        print(f"{sample['task']}#{sample['index']} done", flush=True)
    torch.save(out, args.out)


def sweep(args: argparse.Namespace) -> None:
    """Variants of the estimate over saved facts: kept mass (mean, lowest per-head mean over
    samples and steps, 5th percentile, share below 0.85) and kept fraction."""
    import json

    import nucleus_attn as na

    # the paper's estimate; each variant overrides some of it
    cfg = na.make_config("tactic", p=args.p, exact_fraction=0.02, sample_tokens=32)
    fs = torch.load(args.facts)
    names = args.variants or list(VARIANTS)
    cache: dict = {}

    def ranked_facts(rank):
        if rank not in cache:
            cache[rank] = [ranked(f, rank) for f in fs]
        return cache[rank]

    results = {"oracle-topp": [(f["layer"], *f["oracle"]) for f in fs]}
    for rank in args.ranks:
        results[f"cluster-exact[{rank}]"] = [
            (f["layer"], *outcome(f, prefix_for(f, f["W_r"], args.p)[0]))
            for f in ranked_facts(rank)]
    for name in names:
        var = VARIANTS[name]
        rows = []
        for f in ranked_facts(var.get("rank", "centroid")):
            est, _ = estimate(f, cfg, var)
            rows.append((f["layer"], *outcome(f, prefix_for(f, est, args.p)[0])))
        results[name] = rows
    table = {}
    for name, rows in results.items():
        mass = torch.cat([r[1].flatten() for r in rows])
        kept = torch.cat([r[2].flatten() for r in rows])
        by: dict = {}
        for r in rows:
            for h, m in enumerate(r[1].flatten().tolist()):
                by.setdefault((r[0], h), []).append(m)
        hm = torch.tensor([sum(v) / len(v) for v in by.values()])
        table[name] = {"mass": mass.mean().item(), "head_min": hm.min().item(),
                       "p5": mass.quantile(0.05).item(),
                       "below_085": (mass < 0.85).double().mean().item(),
                       "kept": kept.mean().item()}
        t = table[name]
        print(f"{name:<28} mass {t['mass']:.4f} head-min {t['head_min']:.4f} p5 {t['p5']:.4f} "
              f"<0.85 {t['below_085']:.4f} kept {100 * t['kept']:.2f}%", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"facts": args.facts, "p": args.p, "variants": {
                n: VARIANTS.get(n, {}) for n in results}, "table": table}, fh, indent=1)


def method(args: argparse.Namespace) -> None:
    """The method itself (``tactic.select``, torch path) on the captured steps, per setting:
    exact kept mass per query head and kept fraction per KV head, as the sweep reports."""
    import json

    import nucleus_attn as na
    from nucleus_attn.decode import kept_mass
    from nucleus_attn.methods import tactic
    from nucleus_attn.span import KeySpan

    torch.set_num_threads(args.threads)
    data = torch.load(args.cap)
    settings = {spec: na.parse_method(spec) for spec in args.specs}
    rows: dict = {spec: [] for spec in settings}
    for sample in data:
        n_first = min(r["n"] for r in sample["steps"])
        for spec, cfg in settings.items():
            states = {}
            for li, kk in sample["keys"].items():
                if li >= 2:
                    states[li] = na.new_state(cfg, kk[:, :, :n_first].float(),
                                              KeySpan.full(1, n_first))
            for r in sample["steps"]:
                li = r["layer"]
                if li < 2:
                    continue
                n = r["n"]
                k = sample["keys"][li][:, :, :n].float()
                span = KeySpan.full(1, n)
                states[li].extend(k, span)
                sel = tactic.select(r["q"], k, states[li], span, cfg, r["scale"])
                mass = kept_mass(r["q"], k, span, sel, r["scale"])[0]
                rows[spec].append((li, mass, sel.counts[0].double() / n))
        print(f"{sample['task']}#{sample['index']} done", flush=True)
    table = {}
    for spec, rs in rows.items():
        mass = torch.cat([m for _, m, _ in rs])
        kept = torch.cat([kf for _, _, kf in rs])
        by: dict = {}
        for li, m, _ in rs:
            for h, v in enumerate(m.tolist()):
                by.setdefault((li, h), []).append(v)
        hm = torch.tensor([sum(v) / len(v) for v in by.values()])
        t = {"mass": mass.mean().item(), "head_min": hm.min().item(),
             "p5": mass.quantile(0.05).item(), "below_085": (mass < 0.85).double().mean().item(),
             "kept": kept.mean().item()}
        table[spec] = t
        print(f"{spec:<60} mass {t['mass']:.4f} head-min {t['head_min']:.4f} p5 {t['p5']:.4f} "
              f"<0.85 {t['below_085']:.4f} kept {100 * t['kept']:.2f}%", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"cap": args.cap, "table": table}, fh, indent=1)


VARIANTS = {
    "paper": {},
    "exact4": {"exact_fraction": 0.04},
    "exact8": {"exact_fraction": 0.08},
    "seg128": {"sample_tokens": 128},
    "inflate2": {"inflate": 2.0},
    "jensen": {"floor": "jensen"},
    "centroid": {"fit": "centroid"},
    "centroid+jensen": {"fit": "centroid", "floor": "jensen"},
    "jensen+exact4": {"floor": "jensen", "exact_fraction": 0.04},
    "lognormal": {"rank": "lognormal"},
    "lognormal+exact4": {"rank": "lognormal", "exact_fraction": 0.04},
    "ln+ln-est": {"rank": "lognormal", "fit": "lognormal"},
    "ln+ln-cal": {"rank": "lognormal", "fit": "lognormal-cal"},
    "ln+floor": {"rank": "lognormal", "floor": "lognormal"},
    "ln+floor+exact4": {"rank": "lognormal", "floor": "lognormal", "exact_fraction": 0.04},
    "ln+exact3": {"rank": "lognormal", "exact_fraction": 0.03},
    "ln+exact6": {"rank": "lognormal", "exact_fraction": 0.06},
    "ln+exact4+seg64": {"rank": "lognormal", "exact_fraction": 0.04, "sample_tokens": 64},
    "ln+exact4+pos": {"rank": "lognormal", "exact_fraction": 0.04, "positions": (0.06, 0.3)},
    "bound0.5": {"rank": "bound:0.5"},
    "bound1": {"rank": "bound:1"},
}


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("capture")
    c.add_argument("--tasks", nargs="+", default=["passkey", "multikey"])
    c.add_argument("--samples", type=int, default=3)
    c.add_argument("--length", type=int, default=2048)
    c.add_argument("--steps", type=int, default=4)
    c.add_argument("--threads", type=int, default=1)
    c.add_argument("--out", default="/tmp/tactic_cap.pt")
    fa = sub.add_parser("facts")
    fa.add_argument("--cap", default="/tmp/tactic_cap.pt")
    fa.add_argument("--outliers", type=float, default=0.0)
    fa.add_argument("--threads", type=int, default=1)
    fa.add_argument("--out", default="/tmp/facts.pt")
    sw = sub.add_parser("sweep")
    sw.add_argument("--facts", default="/tmp/facts.pt")
    sw.add_argument("--p", type=float, default=0.9)
    sw.add_argument("--variants", nargs="*")
    sw.add_argument("--ranks", nargs="*", default=["centroid"])
    sw.add_argument("--json")
    me = sub.add_parser("method")
    me.add_argument("--cap", default="/tmp/tactic_cap.pt")
    me.add_argument("--specs", nargs="+", default=[
        "tactic:p=0.9,outliers=0,spread_rank=False,exact_fraction=0.02,sample_tokens=32",
        "tactic:p=0.9"])
    me.add_argument("--threads", type=int, default=1)
    me.add_argument("--json")
    a = ap.parse_args()
    {"capture": capture, "facts": facts, "sweep": sweep, "method": method}[a.cmd](a)
