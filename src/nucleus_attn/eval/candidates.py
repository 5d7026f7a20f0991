"""Candidate quality: does a base selector's candidate set hold the attention that matters?

Twilight prunes the candidates of a base selector with 4-bit estimates and top-p, so it can
only keep what the base proposed: a base that misses the needle makes Twilight miss it at any
``p``. This study measures each base on a real model, at the first decode step of the eval
tasks (the query of the prompt's last token, the cache of the whole prompt), per layer and
query head:

- **oracle share**: the share of the exact ``oracle_p`` (0.9) nucleus's mass that lies inside
  the candidate set (1 = the set holds every token an oracle top-p would keep);
- **needle mass**: the exact mass on the needle's tokens (the positions of the answer inside
  the prompt), and the part of it inside the candidate set. A query head whose needle mass
  is at least ``retrieval`` (0.1) is a *retrieval head* for that sample; it is a *miss* when
  the candidate set keeps less than ``miss`` (half) of its needle mass;
- then Twilight itself per base and ``p``: kept fraction of tokens, exact kept mass, misses.

Candidate selectors (each at the same budget, a fraction of N, sink and window included):
Quest pages of several sizes, Tactic-style K-means clusters, the top tokens by 4-bit
estimated logits (what ``base="dense"`` ranks by) and by exact logits (the best any
token-level candidate set can do). Every selector and Twilight run through the library's own
code (:mod:`nucleus_attn.methods`), on the model's real post-RoPE queries and keys.

The study shares the eval harness's dense prefill (:func:`nucleus_attn.eval.runner.run_cells`
hands each batch's cache to :func:`study_batch`), so it costs one extra single-token forward
per batch; rows (one per sample) go to a JSON-lines file so an interrupted run resumes.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .. import ops
from ..methods.base import forced_positions
from ..methods.oracle import exact_logits
from ..methods.quest import PageState, select_pages
from ..methods.tactic import ClusterState
from ..methods.twilight import Int4Keys, TwilightConfig, TwilightState, cluster_candidates
from ..methods.twilight import select as twilight_select
from ..span import KeySpan

Row = dict[str, Any]

#: Name the capturing attention function is registered under with transformers.
CAPTURE_NAME = "nucleus_attn_capture"


@dataclass(frozen=True)
class StudyConfig:
    """What the candidate study measures.

    Parameters
    ----------
    budgets : tuple of float
        Candidate budgets as fractions of N (default 0.10 and 0.25).
    page_sizes : tuple of int
        Quest page sizes compared as candidate selectors (default 16, 4).
    twilight_bases : tuple of str
        Twilight settings run in full (``"quest"``, ``"quest4"`` = pages of 4, ``"cluster"``,
        ``"dense"``), each at every ``twilight_p`` with ``base_budget`` 0.25.
    twilight_p : tuple of float
        Top-p targets of the Twilight runs (default 0.9, 0.95).
    oracle_p : float
        Mass of the oracle nucleus the candidate sets are judged against (default 0.9).
    retrieval, miss : float
        A query head with needle mass >= ``retrieval`` is a retrieval head; a candidate or
        kept set holding less than ``miss`` of its needle mass misses it (0.1, 0.5).
    dense_layers : int
        First layers left out (they stay dense in every method; default 2).
    sink, window : int
        Tokens every selector keeps by position (default 4 / 64, Twilight's).
    """

    budgets: tuple[float, ...] = (0.10, 0.25)
    page_sizes: tuple[int, ...] = (16, 4)
    twilight_bases: tuple[str, ...] = ("quest", "quest4", "cluster", "dense")
    twilight_p: tuple[float, ...] = (0.9, 0.95)
    oracle_p: float = 0.9
    retrieval: float = 0.1
    miss: float = 0.5
    dense_layers: int = 2
    sink: int = 4
    window: int = 64

    def selectors(self) -> list[str]:
        """Names of the candidate selectors, cheapest metadata first."""
        return [f"quest{ps}" for ps in self.page_sizes] + ["cluster16", "int4", "exact"]

    def twilight_configs(self) -> dict[str, TwilightConfig]:
        """``"<base>@p=<p>"`` -> the Twilight config it runs."""
        out = {}
        for base in self.twilight_bases:
            params: dict[str, Any] = {"base": base}
            if base.startswith("quest") and base != "quest":
                params = {"base": "quest", "page_size": int(base[5:])}
            for p in self.twilight_p:
                out[f"{base}@p={p:g}"] = TwilightConfig(p=p, base_budget=0.25, sink=self.sink,
                                                        window=self.window, **params)
        return out


# --- inputs ------------------------------------------------------------------------------

def needle_positions(tokenizer: Any, prompt: str, answer: str) -> list[int]:
    """Token positions (in the unpadded prompt) of every occurrence of the answer.

    The needle of a retrieval task is the answer's text inside the prompt (a pass key appears
    twice in its sentence, a multikey value once); the tokens overlapping any occurrence
    are returned. Needs a fast tokenizer (character offsets).
    """
    text = answer.strip()
    spans = []
    start = prompt.find(text)
    while text and start >= 0:
        spans.append((start, start + len(text)))
        start = prompt.find(text, start + 1)
    enc = tokenizer(prompt, return_offsets_mapping=True, add_special_tokens=True)
    return [i for i, (a, b) in enumerate(enc["offset_mapping"])
            if b > a and any(a < e and b > s for s, e in spans)]


@contextlib.contextmanager
def capture_attention(model: Any) -> Iterator[dict[int, tuple[Tensor, Tensor, float]]]:
    """Record, per layer, the decode query and the whole cache of the next single-token step.

    Registers a transformers attention function (plain SDPA) that stores ``query[:, :, 0]``
    (``[B, Hq, d]``), ``key`` (``[B, Hkv, N, d]``, post-RoPE) and the softmax scale of each
    layer for ``q_len == 1`` calls; the previous implementation is restored on exit.
    """
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    got: dict[int, tuple[Tensor, Tensor, float]] = {}

    def attend(module: Any, query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None,
               dropout: float = 0.0, scaling: float | None = None, **kw: Any) -> Any:
        if query.shape[2] == 1:
            s = scaling if scaling is not None else getattr(module, "scaling",
                                                            query.shape[-1] ** -0.5)
            got[module.layer_idx] = (query[:, :, 0].clone(), key.clone(), float(s))
        return sdpa_attention_forward(module, query, key, value, mask, dropout=dropout,
                                      scaling=scaling, **kw)

    previous = model.config._attn_implementation or "sdpa"
    AttentionInterface.register(CAPTURE_NAME, attend)
    AttentionMaskInterface.register(CAPTURE_NAME, sdpa_mask)
    model.set_attn_implementation(CAPTURE_NAME)
    try:
        yield got
    finally:
        model.set_attn_implementation(previous)


# --- one layer -----------------------------------------------------------------------------

def _nucleus(probs: Tensor, p: float) -> Tensor:
    """``[..., N]`` bool: the smallest set of highest weights whose mass reaches ``p``."""
    vals, order = torch.sort(probs, dim=-1, descending=True)
    before = torch.cumsum(vals, -1) - vals
    keep = before < p * vals.sum(-1, keepdim=True)
    return torch.zeros_like(keep).scatter_(-1, order, keep)


def _topk_mask(logits: Tensor, span: KeySpan, hkv: int, budget: int, sink: int,
               window: int) -> Tensor:
    agg = ops.group_logsoftmax_max(logits, hkv)
    return ops.keep_best(agg, budget, forced_positions(span, hkv, sink, window))


def layer_candidates(q: Tensor, k: Tensor, span: KeySpan, scale: float, cfg: StudyConfig,
                     keys: Int4Keys, pages: dict[int, PageState],
                     clusters: ClusterState) -> dict[str, dict[float, Tensor]]:
    """``selector -> budget -> [B, Hkv, N]`` bool candidate masks of one layer."""
    n, hkv = k.shape[2], k.shape[1]
    est = ops.int4_scores_range(q, keys.codes, keys.scale, keys.zero, span, scale)
    exact = exact_logits(q, k, span, scale)
    out: dict[str, dict[float, Tensor]] = defaultdict(dict)
    for f in cfg.budgets:
        budget = max(1, math.ceil(f * n))
        for ps, st in pages.items():
            idx, cnt = select_pages(q, st, span, budget, cfg.sink, cfg.window, scale)
            out[f"quest{ps}"][f] = ops.indices_to_mask(idx, cnt, n)
        idx, cnt = cluster_candidates(q, clusters, span, n, budget, cfg.sink, cfg.window, scale)
        out["cluster16"][f] = ops.indices_to_mask(idx, cnt, n)
        out["int4"][f] = _topk_mask(est, span, hkv, budget, cfg.sink, cfg.window)
        out["exact"][f] = _topk_mask(exact, span, hkv, budget, cfg.sink, cfg.window)
    return out


def study_layer(q: Tensor, k: Tensor, span: KeySpan, scale: float, needle: Tensor,
                cfg: StudyConfig) -> dict[str, Any]:
    """Every measurement of one layer, per sequence: lists ``[B][H]`` of floats.

    ``needle`` is ``[B, N]`` bool (the needle's cache positions).
    """
    b, hq, _ = q.shape
    hkv, n = k.shape[1], k.shape[2]
    g = hq // hkv
    probs = torch.softmax(exact_logits(q, k, span, scale), -1)  # [B, Hq, N]
    oracle = _nucleus(probs, cfg.oracle_p) & span.valid_mask()[:, None, :]
    om = (probs * oracle).sum(-1)
    nd = needle[:, None, :].float()
    needle_mass = (probs * nd).sum(-1)  # [B, Hq]
    keys = Int4Keys.build(k)
    page_sizes = set(cfg.page_sizes) | {c.page_size for c in cfg.twilight_configs().values()
                                         if c.base == "quest"}
    pages = {ps: PageState.build(k, span, ps) for ps in sorted(page_sizes)}
    tw = TwilightConfig(base="cluster", sink=cfg.sink, window=cfg.window)
    clusters = ClusterState.build(k, span, tw.cluster_config())

    def per_q(mask: Tensor) -> Tensor:  # [B, Hkv, N] -> [B, Hq, N]
        return mask.repeat_interleave(g, dim=1)

    def lists(x: Tensor) -> list[list[float]]:
        return x.float().round(decimals=5).tolist()

    sel: dict[str, dict[str, Any]] = {}
    for name, by_budget in layer_candidates(q, k, span, scale, cfg, keys, pages,
                                            clusters).items():
        for f, mask in by_budget.items():
            m = per_q(mask)
            share = (probs * oracle * m).sum(-1) / om.clamp(min=1e-30)
            sel[f"{name}@{f:g}"] = {"share": lists(share),
                                    "needle": lists((probs * nd * m).sum(-1))}
    twl: dict[str, dict[str, Any]] = {}
    for name, tcfg in cfg.twilight_configs().items():
        state = TwilightState(pages.get(tcfg.page_size) if tcfg.base == "quest" else None, keys,
                              clusters if tcfg.base == "cluster" else None)
        s = twilight_select(q, k, state, span, tcfg, scale)
        if s.indices is None:
            mask = span.valid_mask()[:, None, :].expand(b, hkv, n)
        else:
            mask = ops.indices_to_mask(s.indices, s.counts, n)
        length = span.lengths[:, None].float()
        twl[name] = {
            "kept": lists(s.counts.float() / length),
            "candidates": lists(s.candidates.float() / length),
            "mass": lists((probs * per_q(mask)).sum(-1)),
            "needle": lists((probs * nd * per_q(mask)).sum(-1)),
        }
    return {"needle_mass": lists(needle_mass), "selectors": sel, "twilight": twl}


# --- one batch -------------------------------------------------------------------------------

def study_batch(model: Any, cache: Any, ids: Tensor, mask: Tensor, needles: list[list[int]],
                cfg: StudyConfig) -> list[dict[str, Any]]:
    """Measure one left-padded batch whose first ``len - 1`` tokens are in ``cache``.

    Runs the prompts' last token through the model densely (on a copy of the cache),
    capturing each layer's query and keys, then :func:`study_layer` per sparse layer.
    ``needles[i]`` are the needle's token positions in prompt ``i`` alone (left padding
    shifts them here). Returns one dict per prompt: ``n`` (its tokens), ``layers`` and, per
    layer, the measurements of :func:`study_layer` for that prompt.
    """
    from .runner import _positions, cache_kwarg

    b, width = ids.shape
    pad = (mask == 0).sum(-1)
    starts = pad.to(torch.int64)
    span = KeySpan(starts, torch.full_like(starts, width), width)
    needle = torch.zeros(b, width, dtype=torch.bool, device=ids.device)
    for i, pos in enumerate(needles):
        if pos:
            needle[i, torch.tensor(pos, device=ids.device) + int(pad[i])] = True
    with capture_attention(model) as got, torch.no_grad():
        model(input_ids=ids[:, -1:], attention_mask=mask, use_cache=True,
              position_ids=_positions(mask)[:, -1:], **{cache_kwarg(model): copy.deepcopy(cache)})
    layers = sorted(i for i in got if i >= cfg.dense_layers)
    out: list[dict[str, Any]] = [{"n": int(width - pad[i]), "needle_tokens": len(needles[i]),
                                  "layers": layers, "per_layer": []} for i in range(b)]
    for li in layers:
        q, k, scale = got[li]
        res = study_layer(q, k, span, scale, needle, cfg)
        for i in range(b):
            out[i]["per_layer"].append(_pick(res, i))
    return out


def _pick(res: Any, i: int) -> Any:
    """Row ``i`` of every ``[B][H]`` list in a nested dict."""
    if isinstance(res, dict):
        return {k: _pick(v, i) for k, v in res.items()}
    return res[i]


# --- rows on disk, summary, report -------------------------------------------------------------

@dataclass
class CandidateRows:
    """Per-sample rows of the study (JSON lines, keyed by task, length, seed and index)."""

    path: Path
    rows: list[Row] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        if self.path.exists():
            lines = self.path.read_text().splitlines()
            for n, line in enumerate(lines, 1):
                try:
                    self.rows.append(json.loads(line))
                except json.JSONDecodeError:  # a line cut by an interruption
                    if n != len(lines):
                        raise ValueError(f"{self.path}:{n} is not JSON; delete the file to "
                                         "start the study afresh") from None
        self._keys = {self.key(r) for r in self.rows}

    @staticmethod
    def key(row: Row) -> tuple:
        return (row["task"], row["length"], row["seed"], row["index"])

    def has(self, task: str, length: int, seed: int, index: int) -> bool:
        return (task, length, seed, index) in self._keys

    def add(self, row: Row) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps(row, separators=(",", ":")) + "\n")
        self.rows.append(row)
        self._keys.add(self.key(row))


def _quantile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, math.floor(q * (len(s) - 1) + 0.5)))]


def summarize(rows: list[Row], cfg: StudyConfig | None = None) -> dict[str, Any]:
    """Aggregate per-sample rows, per context length.

    Returns ``{"lengths": {length: {...}}}``: per selector and budget the mean oracle share
    over (sample, layer, query head), the worst head (lowest per-(layer, head) mean over the
    samples) and the worst single case, the 1st percentile, retrieval heads and misses; per
    Twilight setting the mean kept and candidate fractions, mean exact kept mass, the lowest
    per-(layer, head) mean mass and the lowest single one, and needle misses.
    """
    cfg = cfg or StudyConfig()
    by_len: dict[int, list[Row]] = defaultdict(list)
    for r in rows:
        by_len[r["length"]].append(r)
    out: dict[str, Any] = {"retrieval": cfg.retrieval, "miss": cfg.miss,
                           "oracle_p": cfg.oracle_p, "lengths": {}}
    for length, rs in sorted(by_len.items()):
        sel: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
        head_share: dict[str, dict[tuple[int, int], list[float]]] = defaultdict(
            lambda: defaultdict(list))
        twl: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
        head_mass: dict[str, dict[tuple[int, int], list[float]]] = defaultdict(
            lambda: defaultdict(list))
        layer_share: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
        retrieval = 0
        tasks: dict[str, int] = defaultdict(int)
        for r in rs:
            tasks[r["task"]] += 1
            for li, layer in zip(r["layers"], r["per_layer"], strict=True):
                nm = layer["needle_mass"]
                ret = [h for h, v in enumerate(nm) if v >= cfg.retrieval]
                retrieval += len(ret)
                for name, m in layer["selectors"].items():
                    d = sel[name]
                    d["share"] += m["share"]
                    layer_share[name][li] += m["share"]
                    for h, v in enumerate(m["share"]):
                        head_share[name][(li, h)].append(v)
                    d["misses"].append(sum(m["needle"][h] < cfg.miss * nm[h] for h in ret))
                for name, m in layer["twilight"].items():
                    d = twl[name]
                    d["kept"] += m["kept"]
                    d["candidates"] += m["candidates"]
                    d["mass"] += m["mass"]
                    for h, v in enumerate(m["mass"]):
                        head_mass[name][(li, h)].append(v)
                    d["misses"].append(sum(m["needle"][h] < cfg.miss * nm[h] for h in ret))
        entry: dict[str, Any] = {"samples": len(rs), "tasks": dict(tasks),
                                 "retrieval_heads": retrieval, "selectors": {}, "twilight": {}}
        for name, d in sel.items():
            heads = head_share[name]
            entry["selectors"][name] = {
                "share_mean": sum(d["share"]) / len(d["share"]),
                "share_worst_head": min(sum(v) / len(v) for v in heads.values()),
                "share_p01": _quantile(d["share"], 0.01),
                "share_min": min(d["share"]),
                "misses": sum(d["misses"]),
                "share_per_layer": {str(li): sum(v) / len(v)
                                    for li, v in sorted(layer_share[name].items())},
            }
        for name, d in twl.items():
            heads = head_mass[name]
            entry["twilight"][name] = {
                "kept_mean": sum(d["kept"]) / len(d["kept"]),
                "candidates_mean": sum(d["candidates"]) / len(d["candidates"]),
                "mass_mean": sum(d["mass"]) / len(d["mass"]),
                "mass_worst_head": min(sum(v) / len(v) for v in heads.values()),
                "mass_p01": _quantile(d["mass"], 0.01),
                "mass_min": min(d["mass"]),
                "misses": sum(d["misses"]),
            }
        out["lengths"][str(length)] = entry
    return out


def markdown(summary: dict[str, Any], command: str) -> str:
    """The summary as markdown tables (one section per context length)."""
    sweeps = summary.get("sweeps") or []
    lines = ["# Candidate quality of Twilight's bases (bundled model)", "",
             *[f"Sweep: `{c}`" for c in sweeps], *([""] if sweeps else []),
             f"Summary written by: `{command}`", "",
             f"First decode step of each sample (query of the prompt's last token, the whole "
             f"prompt cached), sparse layers only. *Oracle share*: share of the exact "
             f"{summary['oracle_p']:g}-nucleus mass (per query head) inside the candidate set; "
             f"mean over (sample, layer, query head); *worst head*: lowest per-(layer, head) "
             f"mean over samples; *p1* / *min*: 1st percentile / lowest single case. "
             f"*Retrieval heads*: (sample, layer, query head) with needle mass >= "
             f"{summary['retrieval']:g}; a *miss* keeps less than {summary['miss']:g} of it.",
             ""]
    for length, e in summary["lengths"].items():
        tasks = ", ".join(f"{t} {n}" for t, n in sorted(e["tasks"].items()))
        lines += [f"## {length} tokens: {e['samples']} samples ({tasks}), "
                  f"{e['retrieval_heads']} retrieval heads", "",
                  "| candidate selector @ budget | oracle share mean | worst head | p1 | min "
                  "| needle misses |", "|---|---|---|---|---|---|"]
        for name, s in e["selectors"].items():
            lines.append(f"| {name} | {s['share_mean']:.3f} | {s['share_worst_head']:.3f} | "
                         f"{s['share_p01']:.3f} | {s['share_min']:.3f} | {s['misses']} |")
        lines += ["", "| Twilight base @ p (base_budget 0.25) | kept % | candidates % | "
                  "mass mean | worst head (mean) | p1 | min | needle misses |",
                  "|---|---|---|---|---|---|---|---|"]
        for name, s in e["twilight"].items():
            lines.append(f"| {name} | {100 * s['kept_mean']:.2f} | "
                         f"{100 * s['candidates_mean']:.1f} | {s['mass_mean']:.4f} | "
                         f"{s['mass_worst_head']:.3f} | {s['mass_p01']:.3f} | "
                         f"{s['mass_min']:.3f} | {s['misses']} |")
        lines.append("")
    return "\n".join(lines)


def plot(summary: dict[str, Any], path: Path) -> Path:
    """Per length: oracle share per layer of each selector at the largest budget, and the
    mean / worst-head share and misses of each selector at every budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = list(summary["lengths"])
    fig, axes = plt.subplots(len(lengths), 2, figsize=(12, 4.2 * len(lengths)), squeeze=False)
    for (ax1, ax2), length in zip(axes, lengths, strict=True):
        e = summary["lengths"][length]
        names = list(e["selectors"])
        budgets = sorted({n.split("@")[1] for n in names}, key=float)
        top = budgets[-1]
        for name in (n for n in names if n.endswith("@" + top)):
            per = e["selectors"][name]["share_per_layer"]
            ax1.plot([int(x) for x in per], list(per.values()), marker=".",
                     label=name.split("@")[0])
        ax1.set_xlabel("layer")
        ax1.set_ylabel(f"oracle-{summary['oracle_p']:g} share in the candidates")
        ax1.set_title(f"{length} tokens, candidate budget {float(top) * 100:g}% (mean)")
        ax1.grid(alpha=0.3)
        ax1.legend(fontsize=8)
        sels = list(dict.fromkeys(n.split("@")[0] for n in names))
        width = 0.8 / len(budgets)
        for j, bud in enumerate(budgets):
            xs = [i + j * width for i in range(len(sels))]
            mean = [e["selectors"][f"{s}@{bud}"]["share_mean"] for s in sels]
            worst = [e["selectors"][f"{s}@{bud}"]["share_worst_head"] for s in sels]
            ax2.bar(xs, mean, width, label=f"mean, {float(bud) * 100:g}%", alpha=0.8)
            ax2.scatter(xs, worst, marker="v", color="black", zorder=3,
                        label="worst head" if j == 0 else None)
            for x, s in zip(xs, sels, strict=True):
                m = e["selectors"][f"{s}@{bud}"]["misses"]
                ax2.annotate(str(m), (x, 0.02), ha="center", fontsize=7, color="white")
        ax2.set_xticks([i + 0.4 - width / 2 for i in range(len(sels))], sels, fontsize=8)
        ax2.set_ylim(0, 1.02)
        ax2.set_ylabel("oracle share (numbers: needle misses)")
        ax2.set_title(f"{length} tokens, {e['retrieval_heads']} retrieval heads")
        ax2.legend(fontsize=8, loc="lower right")
        ax2.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write(rows: list[Row], out: Path, command: str, stem: str = "candidates",
          cfg: StudyConfig | None = None, sweeps: list[str] | None = None) -> list[Path]:
    """``<stem>.json`` (the summary), ``<stem>.md`` and ``<stem>.png`` under ``out``.

    ``command`` wrote the summary; ``sweeps`` are the commands whose runs added rows."""
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(rows, cfg)
    summary["command"] = command
    summary["sweeps"] = list(sweeps or [])
    paths = [out / f"{stem}.json", out / f"{stem}.md", out / f"{stem}.png"]
    paths[0].write_text(json.dumps(summary, indent=1) + "\n")
    paths[1].write_text(markdown(summary, command))
    plot(summary, paths[2])
    return paths
