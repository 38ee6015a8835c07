"""`rscir bench rsir`: metrics against hand-computed values and per-query brute force, and an
end-to-end run on a small store of real UC Merced images."""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest

from rscir.bench.rsir import (
    RsirData,
    evaluate_store,
    multi_label_retrieval,
    read_test_captions,
    single_label_retrieval,
    text_image_retrieval,
)
from rscir.cli import main
from rscir.cli.bench import register_rsir
from rscir.train.metrics import image_map

KS = (1, 2, 3, 5)


# ----------------------------------------------------------------------------- brute force


def _order_without_self(scores: np.ndarray, q: int) -> np.ndarray:
    """Other items by descending score, ties by lower index (a per-query loop, on purpose)."""
    others = [j for j in range(len(scores)) if j != q]
    return np.array(sorted(others, key=lambda j: (-scores[j], j)))


def _ap(rel_sorted: np.ndarray) -> float:
    hits, total = 0, 0.0
    for i, r in enumerate(rel_sorted, 1):
        if r:
            hits += 1
            total += hits / i
    return total / hits if hits else 0.0


def _brute_single(emb: np.ndarray, labels: list[str], ks) -> dict[str, np.ndarray]:
    out: dict[str, list[float]] = {"AP": [], **{f"P@{k}": [] for k in ks}}
    sims = emb @ emb.T
    for q in range(len(emb)):
        order = _order_without_self(sims[q], q)
        rel = np.array([labels[j] == labels[q] for j in order])
        out["AP"].append(_ap(rel))
        for k in ks:
            out[f"P@{k}"].append(rel[:k].sum() / k)
    return {k: np.array(v) for k, v in out.items()}


def _brute_multi(emb: np.ndarray, lm: np.ndarray, ks) -> dict[str, np.ndarray]:
    keys = ["AP", "wAP", *[f"{m}@{k}" for m in ("P", "ACG", "NDCG") for k in ks]]
    out: dict[str, list[float]] = {k: [] for k in keys}
    sims = emb @ emb.T
    for q in range(len(emb)):
        if lm[q].sum() == 0:
            continue
        order = _order_without_self(sims[q], q)
        g = np.array([int((lm[q] & lm[j]).sum()) for j in order])
        out["AP"].append(_ap(g > 0))
        acg = [g[:i].mean() for i in range(1, len(g) + 1)]
        out["wAP"].append(sum(acg[i] for i in range(len(g)) if g[i] > 0) / max(1, (g > 0).sum()))
        ideal = sorted(g, reverse=True)
        for k in ks:
            out[f"P@{k}"].append((g[:k] > 0).sum() / k)
            out[f"ACG@{k}"].append(g[:k].mean())
            dcg = sum((2.0 ** g[i] - 1) / math.log2(i + 2) for i in range(min(k, len(g))))
            idcg = sum((2.0 ** ideal[i] - 1) / math.log2(i + 2) for i in range(min(k, len(g))))
            out[f"NDCG@{k}"].append(dcg / idcg if idcg > 0 else 0.0)
    return {k: np.array(v) for k, v in out.items()}


def _unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


# ----------------------------------------------------------------------------- hand-computed


def test_single_label_hand_computed() -> None:
    # 1-D "embeddings" on the unit circle: angles fix the order of every query by hand.
    ang = np.array([0.0, 0.1, 0.3, 1.0])
    emb = np.stack([np.cos(ang), np.sin(ang)], axis=1)
    labels = ["a", "b", "a", "b"]
    m = single_label_retrieval(emb, labels, ks=(1, 2), block=3)  # block < N: chunks agree
    # q0: order 1(b) 2(a) 3(b) -> AP = 1/2 ; q1: 0(a) 2(a) 3(b) -> AP = 1/3
    # q2: 1(b) 0(a) 3(b) -> 1/2 ; q3: 2(a) 1(b) 0(a) -> 1/2
    np.testing.assert_allclose(m["AP"], [1 / 2, 1 / 3, 1 / 2, 1 / 2])
    np.testing.assert_allclose(m["P@1"], [0, 0, 0, 0])
    np.testing.assert_allclose(m["P@2"], [0.5, 0, 0.5, 0.5])
    np.testing.assert_allclose(m["R@2"], [1, 0, 1, 1])


def test_multi_label_hand_computed() -> None:
    ang = np.array([0.0, 0.1, 0.3, 1.0])
    emb = np.stack([np.cos(ang), np.sin(ang)], axis=1)
    lm = np.array([[1, 1, 0], [1, 0, 0], [0, 0, 1], [1, 1, 1]])
    m = multi_label_retrieval(emb, lm, ks=(1, 2))
    # q0 order 1,2,3 gains 1,0,2: AP = (1/1 + 2/3)/2, ACG@1 = 1, ACG@2 = 1/2,
    # wAP = (ACG@1 + ACG@3)/2 = (1 + 1)/2, NDCG@2 = (1 + 0) / (3 + 1/log2(3))
    assert m["AP"][0] == pytest.approx((1 + 2 / 3) / 2)
    assert m["ACG@1"][0] == pytest.approx(1.0)
    assert m["ACG@2"][0] == pytest.approx(0.5)
    assert m["wAP"][0] == pytest.approx(1.0)
    assert m["NDCG@2"][0] == pytest.approx(1 / (3 + 1 / math.log2(3)))
    np.testing.assert_array_equal(m["query"], [0, 1, 2, 3])


def test_label_free_queries_are_left_out() -> None:
    rng = np.random.default_rng(1)
    lm = np.array([[1, 0], [0, 0], [1, 1], [0, 1], [0, 0]])
    m = multi_label_retrieval(_unit(rng, 5, 4), lm, ks=(1,))
    np.testing.assert_array_equal(m["query"], [0, 2, 3])
    assert len(m["AP"]) == 3


def test_text_image_hand_computed() -> None:
    img = np.eye(3, dtype=np.float32)
    table = {"red": [1, 0, 0], "green": [0, 1, 0], "blue": [0, 0, 1], "teal": [0, 0.6, 0.8],
             "same": [0.9, 0.1, 0.0]}

    def embed(texts: list[str]) -> np.ndarray:
        v = np.array([table[t] for t in texts], dtype=np.float64)
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    caps = [["red", "same"], ["green", "same"], ["blue", "teal"]]
    m = text_image_retrieval(img, caps, embed, ks=(1, 2))
    # t2i: red->0 ok, same->0 ok, green->1 ok, same->0 (1 at rank 2), blue->2 ok, teal->2 ok
    assert m["t2i_R@1"] == pytest.approx(5 / 6) and m["t2i_R@2"] == 1.0
    # i2t: each image's best caption is its own (img1: green 1.0 > teal 0.6)
    assert m["i2t_R@1"] == 1.0
    # a caption string shared by two images is correct for both, whichever copy ranks first
    # (image 1's best caption is the copy of "same" written for image 0: a score tie)
    img2 = np.array([[1, 0, 0], embed(["same"])[0], [0, 0, 1]])
    m2 = text_image_retrieval(img2, [["same", "red"], ["same", "green"], ["teal", "blue"]],
                              embed, ks=(1,))
    assert m2["i2t_R@1"] == 1.0
    # t2i: same(0) -> image 1 (a miss), the five others hit
    assert m2["t2i_R@1"] == pytest.approx(5 / 6)
    assert m["mean_recall"] == pytest.approx((5 / 6 + 1 + 1 + 1) / 4)
    # distinct captions: "same" is carried by images 0 and 1 -> a hit at rank 1
    assert m["t2i_distinct_R@1"] == 1.0
    assert m["n_captions"] == 6 and m["n_images"] == 3


# ----------------------------------------------------------------------------- brute force


@pytest.mark.parametrize("seed", [0, 1])
def test_single_label_equals_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    emb = _unit(rng, 37, 6)
    emb[5] = emb[4]  # exact ties are broken like a stable sort
    labels = [str(x) for x in rng.integers(0, 4, 37)]
    m = single_label_retrieval(emb, labels, KS, block=10)
    ref = _brute_single(emb.astype(np.float64), labels, KS)
    for k, v in ref.items():
        np.testing.assert_allclose(m[k], v, atol=1e-9, err_msg=k)
    # without ties, the mean agrees with scikit-learn's label-ranking AP used by `rscir train`
    # (which ranks tied items pessimistically)
    emb[5] = _unit(rng, 1, 6)[0]
    m = single_label_retrieval(emb, labels, KS, block=10)
    assert float(m["AP"].mean()) == pytest.approx(image_map(emb, labels), abs=1e-6)


@pytest.mark.parametrize("seed", [0, 1])
def test_multi_label_equals_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    emb = _unit(rng, 29, 5)
    lm = (rng.random((29, 6)) < 0.3).astype(np.int64)
    lm[3] = 0  # a query with no labels
    m = multi_label_retrieval(emb, lm, KS, block=7)
    ref = _brute_multi(emb.astype(np.float64), lm, KS)
    assert 3 not in m["query"]
    for k, v in ref.items():
        np.testing.assert_allclose(m[k], v, atol=1e-9, err_msg=k)


# ----------------------------------------------------------------------------- end to end


def _subset_folder(shared: Path, dest: Path, per_class: int = 4) -> list[str]:
    """Symlinks (no copies) to a few test-split and train-split UCM images of 4 classes."""
    caps = read_test_captions(shared / "ucm16" / "captions.jsonl")
    classes = ["agricultural", "airplane", "beach", "harbor"]
    chosen: list[str] = []
    for c in classes:
        test = [im for im, _ in caps if im.startswith(c + "/")][:per_class]
        train = [f"{c}/{p.name}" for p in sorted((shared / "ucm16/images" / c).iterdir())
                 if f"{c}/{p.name}" not in test][:2]
        chosen += test + train
    for rel in chosen:
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(shared / "ucm16" / "images" / rel, dest / rel)
    return chosen


def test_end_to_end_on_real_images(shared_data: Path, tiny_encoder, tmp_path: Path,
                                   capsys: pytest.CaptureFixture) -> None:
    from rscir.encoders import load_encoder
    from rscir.ingest import index_folder

    folder = tmp_path / "ucm-subset"
    chosen = _subset_folder(shared_data, folder)
    tiny = tmp_path / "tiny.rscir"
    classic = tmp_path / "classic.rscir"
    index_folder(folder, tiny, tiny_encoder, num_workers=0, progress=False)
    index_folder(folder, classic, load_encoder("classic"), num_workers=0, progress=False)

    out = tmp_path / "out"
    assert main(["bench", "rsir", "--store", str(tiny), "--store", str(classic),
                 "--data", str(shared_data), "--out", str(out), "--ks", "1,5",
                 "--device", "cpu"]) == 0
    assert "Single-label" in capsys.readouterr().out
    res = json.loads((out / "rsir.json").read_text())
    t, c = res["stores"]
    n = len(chosen)
    assert t["n_items"] == n and t["single_label"]["n_queries"] == n
    assert t["single_label"]["n_classes"] == 4
    # image tables equal scikit-learn on the stored embeddings (float16, as stored)
    from rscir.stores import DirectoryStore

    with DirectoryStore.open(tiny) as st:
        ref = image_map(np.asarray(st.embeddings, np.float32), st.items["label"].tolist())
    assert t["single_label"]["mAP"] == pytest.approx(ref, abs=1e-5)
    assert t["multi_label"]["n_items"] == n and t["multi_label"]["n_labels"] == 17
    assert 0 < t["multi_label"]["mAP"] <= 1 and t["multi_label"]["ACG@5"] > 0
    assert t["text"]["n_images"] == 16 and t["text"]["n_captions"] == 80
    assert 0 <= t["text"]["t2i_R@1"] <= t["text"]["t2i_R@5"] <= t["text"]["t2i_R@10"] <= 1
    assert c["text"] is None and any("no text tower" in x for x in c["notes"])
    assert c["single_label"]["mAP"] > 0.4  # 4 visibly different classes; chance is ~0.3
    for name in ("rsir.md", "rsir.csv", "rsir_single_label.csv", "rsir_multi_label.csv",
                 "rsir_text.csv"):
        assert (out / name).is_file(), name
    md = (out / "rsir.md").read_text()
    assert "no text tower" in md and "t2i_R@1" in md


def test_missing_store_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(FileNotFoundError, match="no rscir store"):
        evaluate_store(tmp_path / "nope", RsirData(tmp_path))
    assert main(["bench", "rsir", "--store", str(tmp_path / "nope"), "--out", str(tmp_path)]) == 2
    assert "no rscir store" in capsys.readouterr().err


def test_bad_ks_are_rejected() -> None:
    parser = argparse.ArgumentParser(prog="rscir bench")
    register_rsir(parser.add_subparsers())
    with pytest.raises(SystemExit):
        parser.parse_args(["rsir", "--store", "x", "--ks", "0,5"])


def test_a_multilabel_store_is_evaluated_with_its_own_labels(tmp_path: Path) -> None:
    """A store whose items carry several labels (e.g. BigEarthNet's) gets the multi-label table
    from those labels, equal to multi_label_retrieval on the same matrix."""
    from rscir.encoders.base import ModelInfo, l2_normalize
    from rscir.stores import DirectoryStore

    rng = np.random.default_rng(0)
    names = ["water", "forest", "urban", "crops"]
    lm = (rng.random((60, 4)) < 0.35).astype(np.int8)
    lm[lm.sum(1) == 0, 0] = 1
    x = l2_normalize(lm @ rng.normal(size=(4, 8)) + 0.3 * rng.normal(size=(60, 8)))
    info = ModelInfo(name="m", arch="A", fingerprint="sha256:aa", dim=8)
    with DirectoryStore.create(tmp_path / "s", info, tmp_path) as st:
        st.add(x, [{"path": f"p{i}", "labels": [n for n, b in zip(names, row, strict=True) if b]}
                   for i, row in enumerate(lm)])
    rep = evaluate_store(tmp_path / "s", RsirData(tmp_path / "no-data"), text=False)
    assert rep.multi_label["source"] == "store labels" and rep.multi_label["n_labels"] == 4
    order = np.argsort(names)  # the report's labels are sorted by name
    ref = multi_label_retrieval(np.asarray(x, np.float16).astype(np.float32), lm[:, order])
    assert rep.multi_label["mAP"] == pytest.approx(float(np.mean(ref["AP"])), abs=1e-6)
