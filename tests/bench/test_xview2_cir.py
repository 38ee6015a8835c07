"""xView2-CIR: CSV layout, gallery, metrics against hand-computed values, the runner against
an independent per-query computation, and the CLI on a generated tree in the exact layout."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from rscir.bench.composed import Archive
from rscir.bench.xview2 import (
    COLUMNS,
    REFERENCE_TEXTS,
    build_xview2_queries,
    event_of,
    make_xview2_fixture,
    read_xview2_csv,
    run_xview2,
    split_by_event,
    xview2_metrics,
)
from rscir.cli import main
from rscir.moments import ArchiveMoments
from rscir.scoring import score_exact


def test_metrics_hand_computed() -> None:
    scores = np.array([
        [0.9, 0.1, 0.5, 0.3, 0.2, 0.0],  # target 2: one higher -> rank 2
        [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],  # target 0: rank 6
        [0.7, 0.7, 0.1, 0.0, 0.0, 0.0],  # target 1 tied with column 0 -> rank 2
        [0.4, 0.1, 0.1, 0.1, 0.1, 0.1],  # target 0: rank 1
    ])
    m = xview2_metrics(scores, np.array([2, 0, 1, 0]), ks=(1, 5, 10))
    assert m["R@1"] == 25.0 and m["R@5"] == 75.0 and m["R@10"] == 100.0
    assert m["mAP"] == pytest.approx(100 * (1 / 2 + 1 / 6 + 1 / 2 + 1) / 4)


def test_fixture_layout_and_csv(tmp_path: Path) -> None:
    root = make_xview2_fixture(tmp_path, per_event=3, distractors=1)
    with open(root / "xview2_cir.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == list(COLUMNS) and len(rows) == 1 + 9
    assert rows[1][1:4] == list(REFERENCE_TEXTS["fire"])
    assert rows[1][0].startswith("test/images/socal-fire_") and rows[1][0].endswith(
        "_pre_disaster.tif")
    assert rows[1][4] == rows[1][0].replace("_pre_", "_post_")
    assert all((root / r[0]).is_file() and (root / r[4]).is_file() for r in rows[1:])
    assert len(list((root / "test" / "images").glob("*.tif"))) == 24  # + distractor pairs
    cir = read_xview2_csv(root / "xview2_cir.csv")
    assert len(cir) == 9 and len(cir.gallery("all")) == 18 and len(cir.gallery("targets")) == 9
    assert cir.events()[0] == "socal-fire" and event_of("palu-tsunami_00000181_post_disaster.png"
                                                       ) == "palu-tsunami"
    bad = tmp_path / "bad.csv"
    bad.write_text("image,query,target\na,b,c\n")
    with pytest.raises(ValueError, match="header"):
        read_xview2_csv(bad)
    bad.write_text(",".join(COLUMNS) + "\na.tif,x,y,z,a.tif\n")
    with pytest.raises(ValueError, match="two paths"):
        read_xview2_csv(bad)


def test_split_by_event() -> None:
    v = split_by_event(["a"] * 5 + ["b"] * 2, seed=0)
    assert v[:5].sum() == 2 and v[5:].sum() == 1


def synthetic_archive(cir, dim: int = 16, seed: int = 0):
    """Features where the post tile = its pre tile + a disaster direction: image and text
    together find the target, each alone does not always."""
    rng = np.random.default_rng(seed)
    paths = cir.gallery("all")
    kinds = {t[0]: rng.normal(size=dim) for t in REFERENCE_TEXTS.values()}
    pre = {p: rng.normal(size=dim) for p in cir.images}
    vec = {}
    for p, t, d in zip(cir.images, cir.targets, cir.texts["query_default"], strict=True):
        vec[p] = pre[p]
        vec[t] = pre[p] + 1.5 * kinds[d]
    emb = np.stack([vec[p] / np.linalg.norm(vec[p]) for p in paths]).astype(np.float32)

    def encode(texts):
        out = []
        for t in texts:
            key = next(k for k, v in REFERENCE_TEXTS.items() if t in v)
            v = kinds[REFERENCE_TEXTS[key][0]]
            out.append(v / np.linalg.norm(v))
        return np.array(out, np.float32)

    def archive_for(gallery):
        rows = [paths.index(g) for g in gallery]
        return Archive(emb[rows], list(gallery), ArchiveMoments.of(emb[rows]))

    return archive_for, encode, emb, paths


@pytest.mark.parametrize("keep_query", [False, True])
def test_runner_equals_per_query_computation(tmp_path: Path, keep_query: bool) -> None:
    root = make_xview2_fixture(tmp_path, per_event=6, distractors=0)
    cir = read_xview2_csv(root / "xview2_cir.csv")
    archive_for, encode, emb, paths = synthetic_archive(cir)
    res = run_xview2(root / "xview2_cir.csv", archive_for, encode,
                     methods=["image", "weicom", "weicom+centre+qe"], lams=[0.0, 0.5, 1.0],
                     keep_query=keep_query)
    am = ArchiveMoments.of(emb)
    q = build_xview2_queries(cir, paths)
    for method, lam in (("image", None), ("weicom", 0.5), ("weicom+centre+qe", 0.5)):
        for col in ("query_default", "query_alt2"):
            sel = np.flatnonzero(q.task == col)
            rows = q.query[sel]
            s = score_exact(method, emb[rows], encode([q.texts[t] for t in q.text[sel]]),
                            emb, am, 0.5 if lam is None else lam).scores
            if not keep_query:
                s[np.arange(len(s)), rows] = -np.inf
            target = np.array([q.relevant[g][0] for g in q.group[sel]])
            want = xview2_metrics(s, target)
            assert res.mean(method, lam, col, None, "AP") == pytest.approx(want["mAP"])
            for k in (1, 5, 10):
                assert res.mean(method, lam, col, None, f"R@{k}") == pytest.approx(want[f"R@{k}"])
    # the query tile itself is the best image match when it stays in the gallery
    r1_image = res.mean("image", None, "query_default", None, "R@1")
    assert (r1_image == 0.0) if keep_query else (r1_image > 0.0)
    assert res.mean("weicom", 0.5, "query_default", None) > res.mean("image", None,
                                                                      "query_default", None)


def test_targets_gallery_uses_query_features(tmp_path: Path) -> None:
    root = make_xview2_fixture(tmp_path, per_event=4, distractors=0)
    cir = read_xview2_csv(root / "xview2_cir.csv")
    archive_for, encode, emb, paths = synthetic_archive(cir)
    res = run_xview2(root / "xview2_cir.csv", archive_for, encode, methods=["weicom"],
                     lams=[0.5], gallery="targets", columns=["query_default"])
    assert res.n_database == 12
    tg = archive_for(cir.gallery("targets"))
    qv = archive_for(cir.images).embeddings
    s = score_exact("weicom", qv, encode(cir.texts["query_default"]), tg.embeddings,
                    tg.moments, 0.5).scores
    target = np.array([tg.paths.index(t) for t in cir.targets])
    assert res.mean("weicom", 0.5, "query_default", None) == pytest.approx(
        xview2_metrics(s, target)["mAP"])


def test_cli_xview2_end_to_end(tmp_path: Path, tiny_encoder, capsys) -> None:
    root = make_xview2_fixture(tmp_path, per_event=2, distractors=1, size=24)
    out = tmp_path / "out"
    rc = main(["bench", "xview2-cir", "--data", str(root), "--model", "rscir-tiny",
               "--device", "cpu", "--methods", "weicom", "weicom-x", "harris", "text",
               "--lams", "0,0.5,1", "--qe-k", "2", "--n-components", "4", "--out", str(out),
               "--no-progress", "--json"])
    assert rc == 0
    doc = json.loads(capsys.readouterr().out)
    assert set(doc["summary"]) == {"query_default", "query_alt1", "query_alt2"}
    row = doc["summary"]["query_default"]["weicom"]
    assert {"mAP", "R@1", "R@5", "R@10", "lambda"} <= set(row)
    assert 0 <= row["R@1"] <= row["R@5"] <= row["R@10"] <= 100
    res = json.loads((out / "results.json").read_text())
    assert res["meta"]["n_gallery"] == 12 and res["meta"]["gallery"] == "all"
    assert (out / "map_vs_lambda.png").is_file()
    # the distractor pairs were indexed (same folder) but never enter the gallery
    assert res["n_database"] == 12
    rc = main(["bench", "xview2-cir", "--data", str(tmp_path / "nope"), "--model", "rscir-tiny",
               "--out", str(out)])
    assert rc != 0
