"""rscir train: data sources, metrics, loss, augmentation, training, resume, export, CLI.

Everything runs on tiny synthetic images made here; the text tower is replaced by a fixed random
table (a stand-in with the MiniLM interface) except in the one CLI test that uses MiniLM."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.metrics import average_precision_score

from rscir.cli import main
from rscir.encoders.towers import (
    PixelInput,
    TowerConfig,
    build_tower,
    dihedral,
    embed_cached,
    export_tower,
    load_tower,
)
from rscir.train.data import (
    PairSet,
    Vocabulary,
    join_phrases,
    parse_phrases,
    read_captions,
    read_class_folders,
    read_multilabels,
)
from rscir.train.loop import (
    TrainConfig,
    Trainer,
    contrastive_loss,
    load_inputs,
    make_split,
)
from rscir.train.metrics import evaluate_embeddings, image_map, recall_at_k
from rscir.train.recipe import DataSources, prepare_pairs

torch.set_num_threads(1)

CLASSES = ("beach", "forest", "harbor", "river")


def _make_archive(root: Path, per_class: int = 6, size: int = 24, seed: int = 0) -> Path:
    """Class folders whose images differ by colour *and* orientation-free texture."""
    rng = np.random.default_rng(seed)
    for ci, cls in enumerate(CLASSES):
        d = root / cls
        d.mkdir(parents=True, exist_ok=True)
        base = np.array([(ci * 67 + 30) % 256, (ci * 131 + 60) % 256, (ci * 29 + 90) % 256])
        for i in range(per_class):
            arr = np.clip(base + rng.integers(-25, 25, (size, size + i % 3, 3)), 0, 255)
            Image.fromarray(arr.astype(np.uint8)).save(d / f"{cls}{i:02d}.png")
    return root


def _splits(root: Path, tower_cfg: TowerConfig):
    pairs = read_class_folders(root, templates=("an aerial image of {class}",))
    vocab = Vocabulary.build(pairs)
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((len(vocab.texts), tower_cfg.embed_dim)).astype(np.float32)
    text_emb = torch.from_numpy(emb)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        tower = build_tower(tower_cfg)
    inputs = load_inputs(pairs.paths, tower.input, None, progress=False)
    return pairs, vocab, text_emb, inputs


TINY = TowerConfig(kind="cnn", embed_dim=16, image_size=16, pad=4, width=4, hidden=32, dropout=0.1)
FAST = TrainConfig(epochs=3, batch_size=8, lr=5e-3, warmup_steps=2, seed=3)


def _trainer(root: Path, out: Path | None, cfg: TrainConfig = FAST, tower_cfg: TowerConfig = TINY):
    pairs, vocab, text_emb, inputs = _splits(root, tower_cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        tower = build_tower(tower_cfg)
    tower.fit_input_stats(inputs)
    split = make_split(pairs, vocab, inputs)
    return Trainer(tower, text_emb, vocab.group_of, split, cfg, val=split, out_dir=out,
                   progress=False)


def _full_loss(tr: Trainer) -> float:
    """Deterministic eval-mode loss over the whole training split (first caption per image)."""
    s = tr.train_split
    img = embed_cached(tr.tower, s.inputs, tr.device)
    cap = torch.from_numpy(s.cap_ids[s.cap_offsets[:-1]])
    with torch.no_grad():
        return float(contrastive_loss(img, tr.text_emb[cap], tr.group_of[cap], tr._scale()))


# ---------------------------------------------------------------------------------------------
# data


def test_captions_jsonl_and_csv(tmp_path: Path) -> None:
    root = _make_archive(tmp_path / "images")
    lines = [
        {"image": "beach/beach00.png", "split": "train", "captions": ["sand and sea", "a beach"]},
        {"image": "beach/beach01.png", "split": "test", "captions": ["waves"]},
        {"image": "forest/forest00.png", "captions": "dense trees"},  # no split: kept
    ]
    jf = tmp_path / "caps.jsonl"
    jf.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    s = read_captions(jf)  # images/ next to the file is found on its own
    assert [Path(p).name for p in s.paths] == ["beach00.png", "forest00.png"]
    assert s.captions == [["sand and sea", "a beach"], ["dense trees"]]
    assert s.labels == ["beach", "forest"]
    assert len(read_captions(jf, splits=None)) == 3
    cf = tmp_path / "caps.csv"
    cf.write_text("path,caption\nbeach/beach00.png,a  beach\nbeach/beach00.png,sea|sand\n")
    c = read_captions(cf, root=root)
    assert c.captions == [["a beach", "sea", "sand"]]  # rows merged, whitespace normalized
    bad = tmp_path / "bad.csv"
    bad.write_text("file_name,text2\nx,y\n")
    with pytest.raises(ValueError, match="'image'"):
        read_captions(bad, root=root)
    (tmp_path / "elsewhere").mkdir()
    moved = tmp_path / "elsewhere" / "caps.csv"
    moved.write_text(cf.read_text())
    with pytest.raises(FileNotFoundError, match="--image-root"):
        read_captions(moved)


def test_class_templates_and_multilabel_phrases(tmp_path: Path) -> None:
    root = _make_archive(tmp_path / "images", per_class=2)
    s = read_class_folders(root, templates=("an aerial image of {class}", "{class} seen from above"),
                           phrases={"river": "a river"})
    i = s.labels.index("river")
    assert s.captions[i] == ["an aerial image of a river", "a river seen from above"]
    assert s.groups[i] == ["class:a river", "class:a river"]  # templates of a class are positives
    with pytest.raises(ValueError, match="{class}"):
        read_class_folders(root, templates=("no placeholder",))
    assert join_phrases(["buildings"]) == "buildings"
    assert join_phrases(["buildings", "cars"]) == "buildings and cars"
    assert join_phrases(["buildings", "cars", "trees"]) == "buildings, cars and trees"
    ml = tmp_path / "labels.csv"
    ml.write_text("image,buildings,cars,bare-soil,trees\n"
                  "beach/beach00.png,1,1,0,1\nbeach/beach01.png,0,0,0,0\n"
                  "forest/forest00.png,0,0,1,0\n")
    m = read_multilabels(ml, root=root)
    assert m.captions == [["an aerial image with buildings, cars and trees"],
                          ["an aerial image with bare soil"]]  # no-label row skipped
    assert parse_phrases(["riverlake=river or lake"]) == {"riverlake": "river or lake"}
    with pytest.raises(ValueError, match="NAME=WORDS"):
        parse_phrases(["oops"])


def test_heldout_images_never_reach_training(tmp_path: Path) -> None:
    root = _make_archive(tmp_path / "images")
    caps = tmp_path / "caps.jsonl"
    rows = [{"image": f"{c}/{c}{i:02d}.png", "split": "test" if i < 2 else "train",
             "captions": [f"{c} number {i}"]} for c in CLASSES for i in range(6)]
    caps.write_text("\n".join(json.dumps(r) for r in rows))
    ml = tmp_path / "labels.csv"
    ml.write_text("image,water\n" + "".join(f"{c}/{c}{i:02d}.png,1\n" for c in CLASSES
                                               for i in range(6)))
    src = DataSources(captions=(str(caps),), class_folders=(str(root),), multilabels=(str(ml),),
                      val_fraction=0.25)
    d = prepare_pairs(src, seed=1)
    test = set(d.test.paths)
    assert len(test) == 8
    assert not test & set(d.train.paths) and not test & set(d.val.paths)
    assert not set(d.train.paths) & set(d.val.paths)
    assert len(d.train) + len(d.val) == 16 and len(d.val) == 4
    # merged sources: a train image has its caption, 3 templates and its label phrase
    pool = PairSet.merge([d.train, d.val])
    i = pool.paths.index(str((root / "beach" / "beach03.png").resolve()))
    assert pool.captions[i][0] == "beach number 3" and len(pool.captions[i]) == 5
    again = prepare_pairs(src, seed=1)
    assert again.val.paths == d.val.paths  # seeded split
    with pytest.raises(ValueError, match="no training data"):
        DataSources()


# ---------------------------------------------------------------------------------------------
# metrics and loss


def test_recall_at_k_hand_computed() -> None:
    scores = np.array([[0.9, 0.8, 0.1], [0.9, 0.8, 0.1], [0.5, 0.5, 0.5]])
    rel = np.array([[1, 0, 0], [0, 0, 1], [0, 1, 0]], bool)
    r = recall_at_k(scores, rel, ks=(1, 2, 3))
    # ranks: 1, 3, 3 (a tie counts against the relevant item)
    assert r == {1: pytest.approx(1 / 3), 2: pytest.approx(1 / 3), 3: pytest.approx(1.0)}


def test_image_map_equals_per_query_average_precision() -> None:
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((12, 5))
    labels = list("aaabbbbccdde")  # 'e' has no other member: skipped as a query
    got = image_map(emb, labels)
    aps = []
    for q in range(12):
        others = [j for j in range(12) if j != q]
        y = np.array([labels[j] == labels[q] for j in others])
        if y.any():
            aps.append(average_precision_score(y, emb[others] @ emb[q]))
    assert got == pytest.approx(np.mean(aps))


def test_evaluate_embeddings_perfect_and_chance() -> None:
    eye = np.eye(4, dtype=np.float32)
    caps = [["a"], ["b"], ["c"], ["c", "d"]]
    table = {"a": eye[0], "b": eye[1], "c": eye[2], "d": eye[3]}
    m = evaluate_embeddings(eye, caps, ["x", "x", "y", "y"],
                            lambda ts: np.stack([table[t] for t in ts]))
    assert m["t2i_R@1"] == 1.0  # "c" is relevant to images 2 and 3: image 2 is top
    assert m["t2i_strict_R@1"] == pytest.approx(4 / 5)  # ("c", image 3) loses to image 2
    assert m["i2t_R@1"] == 1.0
    only_img = evaluate_embeddings(eye, caps, ["x", "x", "y", "y"], None)
    assert set(only_img) == {"n_images", "i2i_mAP"}


def test_contrastive_loss_matches_cross_entropy_and_groups() -> None:
    torch.manual_seed(0)
    img = F.normalize(torch.randn(6, 8), dim=-1)
    txt = F.normalize(torch.randn(6, 8), dim=-1)
    scale = torch.tensor(10.0)
    distinct = torch.arange(6)
    logits = scale * img @ txt.T
    want = 0.5 * (F.cross_entropy(logits, torch.arange(6)) + F.cross_entropy(logits.T, torch.arange(6)))
    assert torch.allclose(contrastive_loss(img, txt, distinct, scale), want, atol=1e-6)
    # two pairs sharing a group: a batch where both texts equal both images is a perfect match
    same = F.normalize(torch.randn(1, 8), dim=-1).repeat(2, 1)
    loss = contrastive_loss(same, same, torch.tensor([0, 0]), torch.tensor(10.0))
    assert loss.item() == pytest.approx(math.log(2), abs=1e-5)  # spread over 2 equal positives


def test_dihedral_and_crops() -> None:
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    out = dihedral(x, torch.tensor([0, 1]))
    assert torch.equal(out[0], x[0]) and torch.equal(out[1], torch.rot90(x[1], 1, dims=(-2, -1)))
    views = dihedral(x[:1].repeat(8, 1, 1, 1), torch.arange(8))
    assert len({tuple(v.flatten().tolist()) for v in views}) == 8  # all 8 distinct
    inp = PixelInput(4, 2, (0, 0, 0), (1, 1, 1))
    cached = torch.arange(6 * 6 * 3, dtype=torch.uint8).reshape(1, 6, 6, 3).repeat(3, 1, 1, 1)
    centre = inp.batch(cached, train=False)
    assert torch.equal(centre[0], cached[0, 1:5, 1:5].permute(2, 0, 1).float() / 255)
    pil = Image.fromarray(np.asarray(cached[0]))
    assert torch.equal(inp(pil), centre[0])  # inference preprocess == eval pipeline


# ---------------------------------------------------------------------------------------------
# training


def test_training_lowers_the_loss(tmp_path: Path) -> None:
    tr = _trainer(_make_archive(tmp_path / "a"), None)
    before = _full_loss(tr)
    hist = tr.fit()
    after = _full_loss(tr)
    assert after < before - 0.1, (before, after)
    assert [r["epoch"] for r in hist.rows] == [0, 1, 2, 3]
    assert hist.rows[-1]["val_t2i_R@1"] >= hist.rows[0]["val_t2i_R@1"]


def test_resume_reproduces_the_uninterrupted_run(tmp_path: Path) -> None:
    root = _make_archive(tmp_path / "a")
    cfg = TrainConfig(epochs=3, batch_size=8, lr=5e-3, warmup_steps=2, seed=7, save_every=2)
    full = _trainer(root, tmp_path / "full", cfg)
    full.fit()
    first = _trainer(root, tmp_path / "cut", cfg)
    first.fit(stop_after_steps=4)  # interrupted mid-epoch 2 (3 steps per epoch)
    assert (first.epoch, first.step) == (1, 1)
    resumed = _trainer(root, tmp_path / "cut", cfg)  # a fresh process would start like this
    resumed.fit()
    for (k, a), b in zip(full.tower.state_dict().items(), resumed.tower.state_dict().values(),
                         strict=True):
        assert torch.equal(a, b), k
    assert torch.equal(full.logit_scale, resumed.logit_scale)
    assert [r["loss"] for r in full.history.rows[1:]] == [r["loss"] for r in resumed.history.rows[1:]]
    # a checkpoint of another run is refused, not silently mixed in
    other = _trainer(root, tmp_path / "cut", TrainConfig(epochs=3, batch_size=8, seed=8))
    with pytest.raises(ValueError, match="another run"):
        other.fit()


def test_zero_epochs_keep_the_seeded_initial_tower(tmp_path: Path) -> None:
    """``--epochs 0`` is the random floor of the model card: nothing trained, metrics measured,
    the exported tower is exactly the seeded initial one."""
    root = _make_archive(tmp_path / "a")
    tr = _trainer(root, tmp_path / "r0", TrainConfig(epochs=0, batch_size=8, seed=3))
    init = {k: v.clone() for k, v in tr.tower.state_dict().items()}
    hist = tr.fit()
    assert [r["epoch"] for r in hist.rows] == [0] and "val_t2i_R@1" in hist.rows[0]
    for k, v in tr.tower.state_dict().items():
        assert torch.equal(v, init[k]), k
    trained = _trainer(root, None, TrainConfig(epochs=1, batch_size=8, seed=3))
    trained.fit()
    assert not all(torch.equal(v, init[k]) for k, v in trained.tower.state_dict().items())
    with pytest.raises(ValueError, match="at least 0 epochs"):
        TrainConfig(epochs=-1)


def test_export_roundtrip_and_descriptor_tower(tmp_path: Path) -> None:
    root = _make_archive(tmp_path / "a", per_class=3, size=20)
    cfg = TowerConfig(kind="descriptor", embed_dim=16, hidden=32)
    tr = _trainer(root, None, TrainConfig(epochs=1, batch_size=6, seed=0), cfg)
    tr.fit()
    path = export_tower(tr.tower, tmp_path / "m.safetensors", text={"name": "fake-text"})
    loaded, meta = load_tower(path)
    assert meta["text_model"] == "fake-text" and TowerConfig.from_json(meta["tower"]) == cfg
    pil = Image.open(next((root / "beach").iterdir()))
    x = loaded.input(pil)[None]
    with torch.no_grad():
        assert torch.allclose(loaded(x), tr.tower.eval()(tr.tower.input(pil)[None]), atol=1e-6)
    (tmp_path / "junk.safetensors").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="safetensors"):
        load_tower(tmp_path / "junk.safetensors")


def test_cli_trains_resumes_and_installs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """End to end with the real frozen MiniLM text tower (the slowest test here: ~15 s)."""
    root = _make_archive(tmp_path / "archive", per_class=4, size=20)
    out = tmp_path / "run"
    args = ["train", str(out), "--class-folders", str(root), "--image-size", "16", "--pad", "2",
            "--width", "4", "--hidden", "16", "--epochs", "2", "--batch-size", "6",
            "--val-fraction", "0.25", "--no-progress", "--phrase", "river=a river",
            "--install", str(tmp_path / "w" / "mini.safetensors")]
    assert main(args) == 0
    hist = json.loads((out / "history.json").read_text())
    assert [r["epoch"] for r in hist] == [0, 1, 2]
    assert (out / "model.safetensors").is_file() and (tmp_path / "w" / "mini.safetensors").is_file()
    from rscir.encoders import load_encoder

    enc = load_encoder("rscir-mini", checkpoint=str(out / "model.safetensors"), device="cpu")
    assert enc.dim == 384 and enc.encode_images([np.zeros((20, 20, 3), np.uint8)]).shape == (1, 384)
    # a second run finds the finished checkpoint and does no more steps
    assert main(args) == 0
    assert json.loads((out / "history.json").read_text()) == hist
    capsys.readouterr()
    assert main(["train", str(tmp_path / "x")]) == 2
    assert "no training data" in capsys.readouterr().err


def test_open_clip_tower_can_train_its_own_text_tower(tmp_path: Path) -> None:
    """Fine-tuning a whole open_clip model (image and text towers) writes a checkpoint that the
    open_clip backend loads; the text tower really moved."""
    root = _make_archive(tmp_path / "archive", per_class=3, size=20)
    out = tmp_path / "run"
    assert main(["train", str(out), "--class-folders", str(root), "--tower", "open_clip",
                 "--arch", "RSCIR-Tiny", "--train-text", "--epochs", "1", "--batch-size", "6",
                 "--val-fraction", "0", "--no-progress", "--lr", "1e-3"]) == 0
    from rscir.encoders import load_encoder

    enc = load_encoder(arch="RSCIR-Tiny", checkpoint=str(out / "open_clip_model.pt"), device="cpu")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # the seed the run started from
        init = build_tower(TowerConfig(kind="open_clip", arch="RSCIR-Tiny", embed_dim=32,
                                       train_text=True))
    w0 = init.net.clip.token_embedding.weight
    w1 = enc.model.token_embedding.weight
    assert w0.shape == w1.shape and not torch.allclose(w0, w1)
    hist = json.loads((out / "history.json").read_text())
    assert np.isfinite(hist[-1]["loss"]) and "test_t2i_R@1" not in hist[-1]
