"""Writing benchmark results: Markdown/CSV tables, per-pair JSON and the mAP-vs-λ plot.

The PatternCom tables follow the paper: Table 2 is method × attribute (+ ``avg``) and Table 3 is
WeiCom's λ × attribute (+ ``avg``), both in mAP (%).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .patterncom import PatternComResult


def markdown_table(df: pd.DataFrame, *, floatfmt: str = ".2f") -> str:
    """A GitHub Markdown table of ``df`` (index as the first column). Hand-written because
    ``DataFrame.to_markdown`` needs the optional ``tabulate`` package for a dozen lines of
    output."""

    def cell(v: Any) -> str:
        if isinstance(v, float | np.floating):
            return "" if math.isnan(v) else format(float(v), floatfmt)
        return str(v)

    head = [str(df.index.name or "")] + [str(c) for c in df.columns]
    rows = [[cell(i)] + [cell(v) for v in r] for i, r in zip(df.index, df.to_numpy(), strict=True)]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * len(df.columns)) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def method_table(result: PatternComResult, metric: str = "AP") -> pd.DataFrame:
    """Table 2: one row per configuration (WeiCom once per λ), attributes + ``avg``."""
    return result.table(metric)


def lambda_table(result: PatternComResult, metric: str = "AP") -> pd.DataFrame | None:
    """Table 3: WeiCom's rows indexed by λ, or None when WeiCom was not evaluated."""
    cfgs = sorted((c for c in result.configs if c.method == "weicom"), key=lambda c: c.lam or 0.0)
    if not cfgs:
        return None
    df = result.table(metric, cfgs)
    df.index = pd.Index([f"{c.lam:g}" for c in cfgs], name="lambda")
    return df


def per_pair_records(result: PatternComResult) -> dict[str, Any]:
    """Every (query, text) pair of every attribute with its AP per configuration."""
    out: dict[str, Any] = {}
    for a in result.attributes:
        p = a.pairs
        files, texts, n_rel = p.query_files(), p.text_values(), p.n_relevant()
        aps = {c.label: a.metrics[c].ap for c in result.configs}
        out[a.attribute] = [
            {
                "query": files[i],
                "text": texts[i],
                "n_relevant": int(n_rel[i]),
                "AP": {lab: float(v[i]) for lab, v in aps.items()},
            }
            for i in range(len(p))
        ]
    return out


def plot_lambda(table: pd.DataFrame, path: Path, title: str = "PatternCom: WeiCom mAP vs λ") -> None:
    """mAP against λ, one line per attribute and a thick one for ``avg``. Drawn on a bare
    :class:`~matplotlib.figure.Figure` (Agg canvas), so pyplot's global state is never touched."""
    from matplotlib.figure import Figure

    lams = [float(x) for x in table.index]
    fig = Figure(figsize=(7, 4.5), dpi=120)
    ax = fig.add_subplot()
    for col in table.columns:
        kw = {"color": "black", "linewidth": 2.5} if col == "avg" else {"linewidth": 1.2}
        ax.plot(lams, table[col].to_numpy(float), marker="o", markersize=3, label=col, **kw)
    ax.set_xlabel("λ (0 = image only, 1 = text only)")
    ax.set_ylabel("mAP (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncols=2)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp)
    os.replace(tmp, path)


def write_patterncom_report(
    result: PatternComResult,
    out_dir: str | os.PathLike[str],
    *,
    meta: dict[str, Any] | None = None,
    metrics: Sequence[str] = ("AP",),
) -> dict[str, Path]:
    """Write the tables (``.md`` + ``.csv``), ``metrics.csv`` (every mean, long form),
    ``per_pair.json`` and ``map_vs_lambda.png`` into ``out_dir``; returns the paths by kind."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    md = [f"# PatternCom results\n\nDatabase: {result.n_database} images; "
          f"{sum(len(a.pairs) for a in result.attributes)} (query, text) pairs; "
          f"{result.seconds:.1f} s.\n"]
    for metric in metrics:
        suffix = "" if metric == "AP" else "_" + metric.replace("@", "at")
        t2 = method_table(result, metric)
        t2.to_csv(out / f"table2_methods{suffix}.csv")
        written[f"table2{suffix}"] = out / f"table2_methods{suffix}.csv"
        md.append(f"\n## Table 2: methods ({'mAP' if metric == 'AP' else metric}, %)\n\n")
        md.append(markdown_table(t2))
        t3 = lambda_table(result, metric)
        if t3 is not None:
            t3.to_csv(out / f"table3_lambda{suffix}.csv")
            written[f"table3{suffix}"] = out / f"table3_lambda{suffix}.csv"
            md.append(f"\n## Table 3: WeiCom λ ({'mAP' if metric == 'AP' else metric}, %)\n\n")
            md.append(markdown_table(t3))
            if metric == "AP":
                plot_lambda(t3, out / "map_vs_lambda.png")
                written["plot"] = out / "map_vs_lambda.png"
    pairs_per_attr = pd.DataFrame(
        {"pairs": [len(a.pairs) for a in result.attributes],
         "seconds": [round(a.seconds, 2) for a in result.attributes]},
        index=pd.Index(result.attribute_names(), name="attribute"),
    )
    md.append("\n## Pairs per attribute\n\n" + markdown_table(pairs_per_attr, floatfmt=".2f"))
    _atomic_write(out / "results.md", "".join(md))
    written["markdown"] = out / "results.md"
    result.long_table().to_csv(out / "metrics.csv", index=False)
    written["metrics"] = out / "metrics.csv"
    doc = {
        "meta": dict(meta or {}),
        "n_database": result.n_database,
        "seconds": round(result.seconds, 3),
        "ks": list(result.ks),
        "configs": [{"label": c.label, "method": c.method, "lam": c.lam} for c in result.configs],
        "tables": {"table2": json.loads(method_table(result).to_json(orient="index"))},
        "pairs": per_pair_records(result),
    }
    t3 = lambda_table(result)
    if t3 is not None:
        tables: dict[str, Any] = doc["tables"]  # type: ignore[assignment]  # built just above
        tables["table3"] = json.loads(t3.to_json(orient="index"))
    _atomic_write(out / "per_pair.json", json.dumps(doc, ensure_ascii=False))
    written["json"] = out / "per_pair.json"
    return written


# --------------------------------------------------------------------------- composed / xView2
KEY_METHODS: tuple[str, ...] = (
    "weicom", "weicom+centre", "weicom+qe", "weicom+centre+qe", "weicom-x", "minmax", "harris",
    "basic",
)


def plot_method_lambda(
    result: Any,
    path: Path,
    tasks: Sequence[str],
    *,
    split: str = "test",
    methods: Sequence[str] = KEY_METHODS,
    title: str = "mAP vs λ",
) -> None:
    """One panel per task: mAP on ``split`` against λ for the key λ-methods, with a marker
    at the λ each method picks on ``val`` (PatternCom's λ figure, per method). A bare
    :class:`~matplotlib.figure.Figure`, as :func:`plot_lambda`."""
    from matplotlib.figure import Figure

    shown = [m for m in methods if m in result.methods and result.method_lams(m) != [None]]
    fig = Figure(figsize=(max(6.5, 5.2 * len(tasks)), 4.4), dpi=120)
    axes = fig.subplots(1, len(tasks), squeeze=False)[0]
    lams = [float(x) for x in result.lams]
    for ax, task in zip(axes, tasks, strict=True):
        for m in shown:
            ys = [result.mean(m, lam, task, split) for lam in result.lams]
            kw = {"linewidth": 2.4} if m in ("weicom", "weicom-x") else {"linewidth": 1.2}
            (line,) = ax.plot(lams, ys, label=m, **kw)
            lam_v = result.choose_lambda(m, task, "val")
            ax.plot([lam_v], [result.mean(m, lam_v, task, split)], marker="o",
                    color=line.get_color(), markersize=6)
        for m, style in (("image", ":"), ("text", "--")):
            if m in result.methods:
                ax.axhline(result.mean(m, None, task, split), color="gray", linestyle=style,
                           linewidth=1, label=f"{m} only")
        ax.set_xlabel("λ (0 = image only, 1 = text only)")
        ax.set_ylabel(f"mAP (%), {split} split")
        ax.set_title(f"{title}: {task}", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, ncols=2)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp)
    os.replace(tmp, path)


def write_composed_report(
    result: Any,
    out_dir: str | os.PathLike[str],
    *,
    title: str = "Composed retrieval on real tiles",
    meta: dict[str, Any] | None = None,
    compare: tuple[str, str] = ("weicom-x", "weicom"),
    average_tasks: bool = False,
) -> dict[str, Path]:
    """Tables (``.md`` + ``.csv``) of a :class:`rscir.bench.composed.ComposedResult`: per
    task the method summary / ablation (λ chosen on ``val``, ``test`` reported), the λ table,
    a paired bootstrap of ``compare``; ``per_pair.csv`` (AP at each method's chosen λ) and
    ``map_vs_lambda.png``. ``average_tasks`` adds the ``avg`` pseudo-task (mean of the task
    means, λ chosen on it), first: PatternCom's headline over attributes."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    q = result.queries
    tasks = q.tasks()
    counts = pd.crosstab(pd.Series(q.task, name="task"), pd.Series(q.split, name="split"))
    md = [f"# {title}\n\nArchive: {result.n_database} items; {len(q)} (query, text) pairs; "
          f"{len(result.methods)} methods × {len(result.lams)} λ; {result.seconds:.1f} s. "
          "λ of each method chosen on the `val` split, metrics on `test` (percent).\n"]
    if meta:
        md.append("\n" + "; ".join(f"{k}: {v}" for k, v in meta.items()) + "\n")
    md.append("\n## Pairs\n\n" + markdown_table(counts.rename_axis(index="task"), floatfmt=".0f"))
    if result.skipped:
        md.append("\nSkipped: " + "; ".join(f"{k} ({v})" for k, v in result.skipped.items())
                  + "\n")
    per_pair = q.detail.copy() if len(q.detail) == len(q) else pd.DataFrame(
        {"task": q.task, "query": q.query, "text": [q.texts[t] for t in q.text],
         "split": q.split})
    per_pair["n_relevant"] = q.n_relevant()
    for task in (["avg"] if average_tasks and len(tasks) > 1 else []) + tasks:
        abl = result.ablation(task)
        abl.to_csv(out / f"ablation_{task}.csv")
        written[f"ablation_{task}"] = out / f"ablation_{task}.csv"
        md.append(f"\n## {task}: methods and components (test mAP at the val λ)\n\n")
        md.append(markdown_table(abl))
        lt = result.lambda_table(task, "test")
        lt.to_csv(out / f"lambda_{task}.csv")
        written[f"lambda_{task}"] = out / f"lambda_{task}.csv"
        a, b = compare
        if task != "avg" and a in result.methods and b in result.methods:
            la, lb = result.choose_lambda(a, task), result.choose_lambda(b, task)
            d, lo, hi = result.paired_bootstrap((a, la), (b, lb), task)
            md.append(f"\n{a} − {b} on test (λ {la} vs {lb}): {d:+.2f} mAP, 95% interval "
                      f"[{lo:+.2f}, {hi:+.2f}] (bootstrap over query tiles)\n")
        for m in result.methods if task != "avg" else []:
            lam = result.choose_lambda(m, task)
            col = per_pair.get(f"AP {m}", pd.Series(np.nan, index=per_pair.index))
            sel = q.task == task
            col = col.to_numpy(float, copy=True)
            col[sel] = np.round(100 * result.ap[(m, lam)][sel], 2)
            per_pair[f"AP {m}"] = col
    md.append("\n## mAP (%) on test by λ\n")
    for task in tasks:
        md.append(f"\n### {task}\n\n" + markdown_table(result.lambda_table(task, "test")))
    per_pair.to_csv(out / "per_pair.csv", index=False)
    written["per_pair"] = out / "per_pair.csv"
    plot_tasks = ["avg"] if average_tasks and len(tasks) > 1 else tasks
    plot_method_lambda(result, out / "map_vs_lambda.png", plot_tasks, title=title.split(":")[0])
    written["plot"] = out / "map_vs_lambda.png"
    _atomic_write(out / "results.md", "".join(md))
    written["markdown"] = out / "results.md"
    doc = {"meta": {**dict(meta or {}), **{k: v for k, v in result.meta.items()}},
           "n_database": result.n_database, "seconds": round(result.seconds, 3),
           "lams": list(result.lams), "ks": list(result.ks), "skipped": result.skipped,
           "summary": {t: json.loads(result.summary(t).to_json(orient="index"))
                       for t in (["avg"] if average_tasks and len(tasks) > 1 else []) + tasks}}
    _atomic_write(out / "results.json", json.dumps(doc, ensure_ascii=False, default=str))
    written["json"] = out / "results.json"
    return written
