"""PatternCom protocol: rules, hand-computed APs, equivalence to a straightforward per-query
implementation, report files and the `rscir bench patterncom` CLI."""

from __future__ import annotations

import csv
import json
import os
import pickle
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.special import ndtr

from rscir.bench.fixtures import make_patterncom
from rscir.bench.metrics import relevant_ranks
from rscir.bench.patterncom import (
    Database,
    build_pairs,
    class_of,
    normalize_cdf,
    parse_lams,
    read_attribute_csv,
    run_patterncom,
)
from rscir.cli import main
from rscir.moments import ArchiveMoments
from rscir.scoring import QueryStats, norm_cdf

ATTRS = ("color", "context", "density", "existence", "quantity", "shape")

# --------------------------------------------------------------------------- the naive protocol
# Written from the rules only, one query at a time with a full sorted ranking.
RELEVANCE_MERGE = {
    "denseresidential": "residential", "sparseresidential": "residential",
    "closedroad": "road", "intersection": "road", "bridge": "roadpass", "overpass": "roadpass",
    "ferryterminal": "pier", "harbor": "pier", "parkingspace": "parking", "parkinglot": "parking",
}
GROUPING_MERGE = {
    "density": {"denseresidential", "sparseresidential"},
    "shape": {"closedroad", "intersection"},
    "context": {"bridge", "overpass"},
    "existence": {"ferryterminal", "harbor", "parkingspace", "parkinglot"},
}


def naive_scores(method: str, lam: float, si: np.ndarray, st: np.ndarray) -> np.ndarray:
    if method == "image":
        return si
    if method == "text":
        return st
    if method == "average":
        return (si + st) / 2
    if method == "sum":
        return si + st
    if method == "product":
        return si * st
    ni = ndtr((si - si.mean()) / si.std(ddof=1))
    nt = ndtr((st - st.mean()) / st.std(ddof=1))
    return (1 - lam) * ni + lam * nt


def naive_patterncom(root: Path, feats: np.ndarray, paths: list[str], texts: dict, configs):
    """{config: {attribute: [per-pair AP in %]}}; configs are (label, method, lam)."""
    feats = feats.astype(np.float64)
    names = [os.path.basename(p) for p in paths]
    out = {c[0]: {} for c in configs}
    for attr in ATTRS:
        with open(root / "PatternCom" / f"{attr}.csv", newline="") as f:
            rows = [r for r in csv.reader(f) if r]
        cls = [re.split(r"\d", r[0])[0] for r in rows]
        grp = [RELEVANCE_MERGE[c] if c in GROUPING_MERGE.get(attr, ()) else c for c in cls]
        values: dict[str, set] = {}
        for g, r in zip(grp, rows, strict=True):
            values.setdefault(g, set()).add(r[2])
        value_of = {r[0]: r[2] for r in rows}  # later rows overwrite earlier ones
        db_value = np.array([value_of.get(n, "\0") for n in names])
        db_class = np.array([RELEVANCE_MERGE.get(re.split(r"\d", n)[0], re.split(r"\d", n)[0])
                             for n in names])
        for c in configs:
            out[c[0]][attr] = []
        for i, r in enumerate(rows):
            q = max(j for j, n in enumerate(names) if n == r[0])
            qclass = RELEVANCE_MERGE.get(cls[i], cls[i])
            si = feats @ feats[q]
            for t in sorted(values[grp[i]] - {r[2]}):
                st = feats @ texts[t].astype(np.float64)
                rel = (db_value == t) & (db_class == qclass)
                for label, method, lam in configs:
                    order = np.argsort(-naive_scores(method, lam, si, st), kind="stable")
                    hit = rel[order]
                    k = np.flatnonzero(hit) + 1
                    ap = np.mean(np.arange(1, len(k) + 1) / k) if len(k) else 0.0
                    out[label][attr].append(round(ap * 100, 2))
    return out


CONFIGS = [("image", "image", None), ("text", "text", None), ("average", "average", None),
           ("sum", "sum", None), ("product", "product", None)] + [
    (f"weicom@{x:g}", "weicom", x) for x in (0.0, 0.3, 0.5, 0.8, 1.0)]


@pytest.fixture(scope="module")
def fixture_tree(tmp_path_factory):
    return make_patterncom(tmp_path_factory.mktemp("pc"), per_class=20, dim=64, duplicate_rows=4,
                           noise=1.0, seed=3)


@pytest.fixture(scope="module")
def fixture_result(fixture_tree):
    fx = fixture_tree
    return run_patterncom(fx.root, Database(fx.features, fx.paths), fx.text_features,
                          methods=["image", "text", "average", "sum", "product", "weicom"],
                          lams=[0, 0.3, 0.5, 0.8, 1], workers=2, block=16, progress=False)


def test_tables_equal_naive_implementation(fixture_tree, fixture_result):
    fx, res = fixture_tree, fixture_result
    naive = naive_patterncom(fx.root, fx.features, fx.paths, fx.text_features, CONFIGS)
    table = res.table()
    assert sorted(table.index) == sorted(c[0] for c in CONFIGS)
    for label, *_ in CONFIGS:
        means = {a: round(float(np.mean(naive[label][a])), 2) for a in ATTRS}
        for a in ATTRS:
            assert table.loc[label, a] == pytest.approx(means[a], abs=0.0101), (label, a)
        avg = round(float(np.mean(list(means.values()))), 2)
        assert table.loc[label, "avg"] == pytest.approx(avg, abs=0.0101), label
    # the same pairs, in CSV order, and per-pair APs agree too
    for a in res.attributes:
        cfg = {c.label: c for c in res.configs}
        for label, *_ in CONFIGS:
            ours = a.metrics[cfg[label]].ap
            assert len(ours) == len(naive[label][a.attribute])
            np.testing.assert_allclose(np.sort(ours), np.sort(naive[label][a.attribute]),
                                       atol=0.0101)
    # the fixture makes the methods differ; WeiCom at λ=0/1 is image/text only
    assert table.loc["weicom@0.5", "avg"] > table.loc["image", "avg"]
    assert table.loc["weicom@0", "avg"] == table.loc["image", "avg"]
    assert table.loc["weicom@1", "avg"] == table.loc["text", "avg"]


def test_chunking_and_threads_do_not_change_results(fixture_tree, fixture_result):
    fx = fixture_tree
    res = run_patterncom(fx.root, Database(fx.features, fx.paths), fx.text_features,
                         methods=["image", "text", "average", "sum", "product", "weicom"],
                         lams=[0, 0.3, 0.5, 0.8, 1], workers=1, block=1000,
                         memory_cap=1, progress=False)
    pd.testing.assert_frame_equal(res.table(), fixture_result.table())
    for a, b in zip(res.attributes, fixture_result.attributes, strict=True):
        for c in res.configs:
            np.testing.assert_array_equal(a.metrics[c].ap, b.metrics[c].ap)
            np.testing.assert_array_equal(a.metrics[c].precision, b.metrics[c].precision)


# --------------------------------------------------------------------------- hand-computed case
def _write_csv(path: Path, rows: list[tuple[str, str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)


def _angles(degrees: list[float]) -> np.ndarray:
    r = np.deg2rad(degrees)
    return np.stack([np.cos(r), np.sin(r)], axis=1).astype(np.float32)


def test_hand_computed_aps(tmp_path):
    # 2-D features at angles: the image ranking of each query is by angular distance.
    names = ["swimmingpool1.jpg", "tenniscourt1.jpg", "swimmingpool2.jpg",
             "swimmingpool4.jpg", "swimmingpool3.jpg"]
    feats = _angles([0, 15, 40, 70, 110])
    _write_csv(tmp_path / "PatternCom" / "shape.csv", [
        ("swimmingpool1.jpg", "shape", "oval"), ("swimmingpool2.jpg", "shape", "rectangular"),
        ("swimmingpool3.jpg", "shape", "rectangular"), ("swimmingpool4.jpg", "shape", "kidney"),
    ])
    texts = {t: v for t, v in zip(["kidney", "oval", "rectangular"], _angles([200, 220, 250]),
                                  strict=True)}
    res = run_patterncom(tmp_path, Database(feats, [f"images/x/{n}" for n in names]), texts,
                         methods=["image"], attributes=["shape"], progress=False)
    (a,) = res.attributes
    got = dict(zip(zip(a.pairs.query_files(), a.pairs.text_values(), strict=True),
                   a.metrics[res.configs[0]].ap, strict=True))
    # pool1 ranks: p1 t p2 p4 p3 | pool2: p2 t p4 p1 p3 | pool3: p3 p4 p2 t p1 | pool4: p4 p2 p3 t p1
    expected = {
        ("swimmingpool1.jpg", "kidney"): 25.0,  # p4 at 4
        ("swimmingpool1.jpg", "rectangular"): 36.67,  # p2 at 3, p3 at 5: (1/3 + 2/5) / 2
        ("swimmingpool2.jpg", "kidney"): 33.33,
        ("swimmingpool2.jpg", "oval"): 25.0,
        ("swimmingpool3.jpg", "kidney"): 50.0,
        ("swimmingpool3.jpg", "oval"): 20.0,
        ("swimmingpool4.jpg", "oval"): 20.0,
        ("swimmingpool4.jpg", "rectangular"): 58.33,  # p2 at 2, p3 at 3: (1/2 + 2/3) / 2
    }
    assert got == expected
    assert res.table().loc["image", "shape"] == 33.54  # 268.33 / 8
    m = a.metrics[res.configs[0]]
    i = list(got).index(("swimmingpool1.jpg", "rectangular"))
    np.testing.assert_array_equal(m.precision[i], [40.0, 20.0, 13.33, 10.0])  # 2 hits / k
    np.testing.assert_array_equal(m.recall[i], [100.0] * 4)


def test_last_row_wins_and_no_relevant_image_scores_zero(tmp_path):
    # pool2 is listed twice; its last value (oval) is the one relevance sees, so nothing is
    # "rectangular" and that text's pairs score 0, yet both rows are queries.
    _write_csv(tmp_path / "PatternCom" / "shape.csv", [
        ("swimmingpool1.jpg", "shape", "oval"), ("swimmingpool2.jpg", "shape", "rectangular"),
        ("swimmingpool2.jpg", "shape", "oval"),
    ])
    names = ["images/p/swimmingpool1.jpg", "images/p/swimmingpool2.jpg"]
    pairs = build_pairs(read_attribute_csv(tmp_path / "PatternCom" / "shape.csv"), names)
    assert list(zip(pairs.query_files(), pairs.text_values(), strict=True)) == [
        ("swimmingpool1.jpg", "rectangular"), ("swimmingpool2.jpg", "oval"),
        ("swimmingpool2.jpg", "rectangular"),
    ]
    assert pairs.n_relevant().tolist() == [0, 2, 0]
    res = run_patterncom(tmp_path, Database(_angles([0, 30]), names),
                         {"oval": _angles([5])[0], "rectangular": _angles([60])[0]},
                         methods=["image", "weicom"], attributes=["shape"], progress=False)
    for c in res.configs:
        np.testing.assert_array_equal(res.attributes[0].metrics[c].ap, [0.0, 100.0, 0.0])


# --------------------------------------------------------------------------- class merges
def test_class_of():
    assert class_of("denseresidential012.jpg") == "denseresidential"
    assert class_of("images/swimming_pool/swimmingpool800.jpg") == "swimmingpool"


def test_relevance_merges_apply_in_every_attribute(tmp_path):
    # color: harbor and ferryterminal are NOT pooled for texts, but are merged for relevance.
    rows = [("harbor1.jpg", "color", "blue"), ("harbor2.jpg", "color", "green"),
            ("ferryterminal1.jpg", "color", "white"), ("ferryterminal2.jpg", "color", "green")]
    _write_csv(tmp_path / "color.csv", rows)
    names = [r[0] for r in rows] + ["beach1.jpg"]
    p = build_pairs(read_attribute_csv(tmp_path / "color.csv"), names)
    got = {(q, t): sorted(names[j] for j in p.relevant[g])
           for q, t, g in zip(p.query_files(), p.text_values(), p.group, strict=True)}
    assert got == {
        ("harbor1.jpg", "green"): ["ferryterminal2.jpg", "harbor2.jpg"],
        ("harbor2.jpg", "blue"): ["harbor1.jpg"],
        ("ferryterminal1.jpg", "green"): ["ferryterminal2.jpg", "harbor2.jpg"],
        ("ferryterminal2.jpg", "white"): ["ferryterminal1.jpg"],
    }


@pytest.mark.parametrize(
    ("attribute", "a", "b"),
    [("density", "denseresidential", "sparseresidential"), ("shape", "closedroad", "intersection"),
     ("context", "bridge", "overpass"), ("existence", "ferryterminal", "harbor"),
     ("existence", "parkingspace", "parkinglot")],
)
def test_attribute_scoped_grouping_merges(tmp_path, attribute, a, b):
    rows = [(f"{a}1.jpg", attribute, "x"), (f"{a}2.jpg", attribute, "y"),
            (f"{b}1.jpg", attribute, "z")]
    for attr in (attribute, "quantity"):  # the same rows in an attribute without the merge
        _write_csv(tmp_path / f"{attr}.csv", [(f, attr, v) for f, _, v in rows])
    names = [r[0] for r in rows]
    merged = build_pairs(read_attribute_csv(tmp_path / f"{attribute}.csv"), names)
    texts = {}
    for q, t in zip(merged.query_files(), merged.text_values(), strict=True):
        texts.setdefault(q, []).append(t)
    assert texts == {f"{a}1.jpg": ["y", "z"], f"{a}2.jpg": ["x", "z"], f"{b}1.jpg": ["x", "y"]}
    rel = dict(zip(zip(merged.query_files(), merged.text_values(), strict=True),
                   [names[j] for g in merged.group for j in merged.relevant[g]], strict=True))
    assert rel[(f"{b}1.jpg", "x")] == f"{a}1.jpg"  # relevance merges the classes too
    plain = build_pairs(read_attribute_csv(tmp_path / "quantity.csv"), names)
    assert list(zip(plain.query_files(), plain.text_values(), strict=True)) == [
        (f"{a}1.jpg", "y"), (f"{a}2.jpg", "x")]  # b's only value has no other: no pair


def test_missing_query_image(tmp_path):
    _write_csv(tmp_path / "shape.csv", [("pool1.jpg", "shape", "a"), ("pool2.jpg", "shape", "b")])
    table = read_attribute_csv(tmp_path / "shape.csv")
    with pytest.raises(ValueError, match="not in the database"):
        build_pairs(table, ["pool1.jpg"])
    p = build_pairs(table, ["pool1.jpg"], skip_missing=True)
    assert p.query_files() == ["pool1.jpg"] and p.missing_queries == ["pool2.jpg"]


# --------------------------------------------------------------------------- building blocks
def test_normalization_matches_full_archive_statistics():
    rng = np.random.default_rng(0)
    db = rng.standard_normal((500, 16)).astype(np.float32)
    q = rng.standard_normal((7, 16)).astype(np.float32)
    s = q @ db.T
    st = ArchiveMoments.of(db, chunk=64).query_stats(q)
    full = QueryStats.of(s)
    np.testing.assert_allclose(st.mean, full.mean, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(st.std, full.std, rtol=1e-5)
    np.testing.assert_allclose(normalize_cdf(s, st), norm_cdf(s, full), atol=2e-6)


def test_relevant_ranks_equal_stable_sort_with_ties():
    rng = np.random.default_rng(1)
    scores = rng.integers(0, 6, size=(40, 30)).astype(np.float32)  # many ties
    rel = rng.random((40, 30)) < 0.3
    cols = [np.flatnonzero(r) for r in rel]
    m = max(len(c) for c in cols)
    pad = np.zeros((40, m), np.int64)
    valid = np.zeros((40, m), bool)
    for i, c in enumerate(cols):
        pad[i, : len(c)], valid[i, : len(c)] = c, True
    ranks = relevant_ranks(scores, pad, valid)
    for i in range(40):
        order = np.argsort(-scores[i], kind="stable")
        pos = np.empty(30, np.int64)
        pos[order] = np.arange(1, 31)
        assert ranks[i, valid[i]].tolist() == pos[cols[i]].tolist()


def test_parse_lams():
    assert parse_lams("0:1:0.1") == [round(0.1 * i, 1) for i in range(11)]
    assert parse_lams(["0.5", "0.3,0.7"]) == [0.5, 0.3, 0.7]
    for bad in ("0:1", "1:0:0.1", "x", "1.5"):
        with pytest.raises(ValueError):
            parse_lams(bad)


# --------------------------------------------------------------------------- CLI and outputs
def test_cli_end_to_end(fixture_tree, fixture_result, tmp_path, capsys):
    fx = fixture_tree
    out = tmp_path / "out"
    rc = main(["bench", "patterncom", "--data", str(fx.root), "--features",
               str(fx.features_path), "--text-features", str(fx.text_features_path),
               "--methods", "image", "text", "average", "sum", "product", "weicom",
               "--lams", "0", "0.3,0.5", "0.8:1:0.2", "--out", str(out), "--no-progress",
               "--all-metrics"])
    assert rc == 0
    assert "weicom@0.5" in capsys.readouterr().out
    names = {p.name for p in out.iterdir()}
    assert {"table2_methods.csv", "table3_lambda.csv", "results.md", "per_pair.json",
            "metrics.csv", "map_vs_lambda.png"} <= names
    t2 = pd.read_csv(out / "table2_methods.csv", index_col=0)
    pd.testing.assert_frame_equal(t2, fixture_result.table(), check_names=False)
    t3 = pd.read_csv(out / "table3_lambda.csv", index_col=0)
    assert list(t3.index) == [0, 0.3, 0.5, 0.8, 1.0]
    assert t3.loc[0.5, "avg"] == t2.loc["weicom@0.5", "avg"]
    assert (out / "map_vs_lambda.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    p10 = pd.read_csv(out / "table2_methods_Pat10.csv", index_col=0)
    pd.testing.assert_frame_equal(p10, fixture_result.table("P@10"), check_names=False)
    long = pd.read_csv(out / "metrics.csv")
    assert set(long["metric"]) == {"AP"} | {f"{m}@{k}" for m in "PR" for k in (5, 10, 15, 20)}
    md = (out / "results.md").read_text()
    assert "| weicom@0.5 |" in md and "## Table 3" in md
    doc = json.loads((out / "per_pair.json").read_text())
    shape = doc["pairs"]["shape"]
    res_shape = next(a for a in fixture_result.attributes if a.attribute == "shape")
    assert len(shape) == len(res_shape.pairs)
    assert [p["AP"]["text"] for p in shape] == res_shape.metrics[
        next(c for c in fixture_result.configs if c.label == "text")].ap.tolist()


def test_cli_json_text_features(fixture_tree, tmp_path, capsys):
    fx = fixture_tree
    tf = tmp_path / "texts.json"
    tf.write_text(json.dumps({t: v.tolist() for t, v in fx.text_features.items()}))
    rc = main(["bench", "patterncom", "--data", str(fx.root), "--features",
               str(fx.features_path), "--text-features", str(tf), "--methods", "text",
               "--attributes", "shape", "--out", str(tmp_path / "o"), "--no-progress", "--json"])
    assert rc == 0
    doc = json.loads(capsys.readouterr().out)
    assert set(doc["table2"]) == {"text"} and doc["table3"] is None


def _run_bad(args: list[str], capsys) -> str:
    assert main(args) == 2
    return capsys.readouterr().err


def test_cli_bad_inputs(fixture_tree, tmp_path, capsys):
    fx = fixture_tree
    base = ["bench", "patterncom", "--out", str(tmp_path / "o"), "--no-progress"]
    files = ["--features", str(fx.features_path), "--text-features", str(fx.text_features_path)]
    # a missing attribute CSV
    data = tmp_path / "PatternNet"
    (data / "PatternCom").mkdir(parents=True)
    (data / "PatternCom" / "shape.csv").write_bytes(
        (fx.root / "PatternCom" / "shape.csv").read_bytes())
    err = _run_bad(base + ["--data", str(data)] + files, capsys)
    assert "color.csv" in err and "missing" in err
    # no PatternCom at all
    assert "no PatternCom CSVs" in _run_bad(base + ["--data", str(tmp_path / "nope")] + files,
                                            capsys)
    # features and paths of different lengths
    bad = tmp_path / "bad.pkl"
    with open(bad, "wb") as f:
        pickle.dump({"feats": fx.features, "labels": fx.labels, "paths": fx.paths[:-1]}, f)
    err = _run_bad(base + ["--data", str(fx.root), "--features", str(bad), "--text-features",
                           str(fx.text_features_path)], capsys)
    assert "do not match" in err
    # a text without features
    partial = tmp_path / "partial.npz"
    keep = sorted(fx.text_features)[1:]
    np.savez(partial, texts=np.array(keep), features=np.stack([fx.text_features[t] for t in keep]))
    err = _run_bad(base + ["--data", str(fx.root), "--features", str(fx.features_path),
                           "--text-features", str(partial)], capsys)
    assert "no text features" in err and sorted(fx.text_features)[0] in err
    # not a feature file, and no source at all
    junk = tmp_path / "junk.pkl"
    junk.write_bytes(b"not a pickle")
    assert "readable pickle" in _run_bad(
        base + ["--data", str(fx.root), "--features", str(junk), "--text-features",
                str(fx.text_features_path)], capsys)
    assert "either --model" in _run_bad(base + ["--data", str(fx.root)], capsys)
    assert "lambda must be in [0, 1]" in _run_bad(
        base + ["--data", str(fx.root), "--lams", "2"] + files, capsys)


def test_cli_with_model_indexes_once_and_caches_texts(tmp_path, tiny_encoder, capsys):
    fx = make_patterncom(tmp_path, per_class=2, dim=8, labeled_fraction=1.0, write_images=True)
    out = tmp_path / "out"
    args = ["bench", "patterncom", "--data", str(fx.root), "--model", "rscir-tiny", "--device",
            "cpu", "--out", str(out), "--no-progress", "--methods", "image", "weicom",
            "--attributes", "shape", "quantity"]
    assert main(args) == 0
    caches = list((out / "store" / "artifacts" / "patterncom").glob("texts-*.npz"))
    assert len(caches) == 1
    t2 = pd.read_csv(out / "table2_methods.csv", index_col=0)
    mtime = caches[0].stat().st_mtime_ns
    assert main(args) == 0  # reuses the store and the cached texts
    assert caches[0].stat().st_mtime_ns == mtime
    pd.testing.assert_frame_equal(pd.read_csv(out / "table2_methods.csv", index_col=0), t2)
    # the store alone (its model embeds the texts) gives the same tables
    assert main(["bench", "patterncom", "--data", str(fx.root), "--features", str(out / "store"),
                 "--out", str(tmp_path / "o2"), "--no-progress", "--methods", "image", "weicom",
                 "--attributes", "shape", "quantity"]) == 0
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "o2" / "table2_methods.csv",
                                              index_col=0), t2)
