"""The training loss as users see it: finite from the first logged row, decreasing on real
tiles, epochs numbered 1..N, and strict JSON in the run folder (issue 16 item 6).

Row 0 of the history used to carry a NaN placeholder ("epoch 0 | loss nan"), written as the
non-standard token NaN into history.json and metrics.json."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from rscir.cli import main
from rscir.encoders.towers import TowerConfig, build_tower
from rscir.errors import ModelError
from rscir.train.data import Vocabulary, read_class_folders
from rscir.train.loop import TrainConfig, Trainer, load_inputs, make_split
from rscir.train.recipe import format_row

torch.set_num_threads(1)


def _strict_json(path: Path):
    def refuse(token: str):
        raise AssertionError(f"{path.name} holds the non-JSON token {token}")

    return json.loads(path.read_text(), parse_constant=refuse)


def _ucm_captions(shared: Path, out: Path, classes: int = 6, per_class: int = 8) -> Path:
    """A captions file over real UCM tiles: per class, 6 train and 2 test images."""
    rows = [json.loads(x) for x in (shared / "ucm16" / "captions.jsonl").read_text().splitlines()]
    by_class: dict[str, list[dict]] = {}
    for r in rows:
        by_class.setdefault(r["image"].split("/")[0], []).append(r)
    keep = []
    for c in sorted(by_class)[:classes]:
        keep += [r for r in by_class[c] if r["split"] == "train"][: per_class - 2]
        keep += [r for r in by_class[c] if r["split"] == "test"][:2]
    out.write_text("".join(json.dumps(r) + "\n" for r in keep))
    return out


def test_short_run_on_real_tiles_logs_finite_decreasing_loss(shared_data, tmp_path, capsys):
    caps = _ucm_captions(shared_data, tmp_path / "caps.jsonl")
    out = tmp_path / "run"
    assert main(["train", str(out), "--captions", str(caps), "--image-root",
                 str(shared_data / "ucm16" / "images"), "--epochs", "2", "--batch-size", "16",
                 "--image-size", "32", "--width", "4", "--hidden", "32", "--no-progress"]) == 0
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if " | loss " in ln]
    assert [ln.split(" | ")[0] for ln in lines] == ["before training", "epoch 1/2", "epoch 2/2"]
    assert "nan" not in err.lower()
    hist = _strict_json(out / "history.json")
    losses = [r["loss"] for r in hist]
    assert [r["epoch"] for r in hist] == [0, 1, 2]
    assert all(math.isfinite(x) for x in losses)
    assert losses[0] > losses[1] > losses[2], losses  # measured: 3.005 > 2.872 > 2.452
    assert losses[0] == pytest.approx(math.log(16), rel=0.15)  # ~chance for a batch of 16
    metrics = _strict_json(out / "metrics.json")
    assert metrics["initial"]["loss"] == losses[0]


CLASSES = ("beach", "forest", "harbor", "river")
TINY = TowerConfig(kind="cnn", embed_dim=16, image_size=16, pad=4, width=4, hidden=32, dropout=0.1)


def _trainer(tmp_path: Path, cfg: TrainConfig, text_emb: torch.Tensor | None = None) -> Trainer:
    from PIL import Image

    rng = np.random.default_rng(0)
    for ci, cls in enumerate(CLASSES):
        (tmp_path / cls).mkdir(parents=True, exist_ok=True)
        for i in range(6):
            arr = np.clip(ci * 60 + rng.integers(-25, 25, (24, 24, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(tmp_path / cls / f"{cls}{i}.png")
    pairs = read_class_folders(tmp_path, templates=("an aerial image of {class}",))
    vocab = Vocabulary.build(pairs)
    if text_emb is None:
        text_emb = torch.from_numpy(
            np.random.default_rng(0).standard_normal((len(vocab.texts), 16)).astype(np.float32))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        tower = build_tower(TINY)
    inputs = load_inputs(pairs.paths, tower.input, None, progress=False)
    tower.fit_input_stats(inputs)
    return Trainer(tower, text_emb, vocab.group_of, make_split(pairs, vocab, inputs), cfg,
                   progress=False)


def test_initial_loss_is_measured_without_touching_the_tower(tmp_path):
    cfg = TrainConfig(epochs=1, batch_size=8, lr=5e-3, warmup_steps=1, seed=3)
    tr = _trainer(tmp_path, cfg)
    before = {k: v.clone() for k, v in tr.tower.state_dict().items()}
    first = tr.initial_loss()
    assert math.isfinite(first) and tr.initial_loss() == first  # same batches, same draws
    for k, v in tr.tower.state_dict().items():  # incl. BatchNorm running statistics
        assert torch.equal(v, before[k]), k
    hist = tr.fit()
    assert hist.rows[0]["loss"] == first and math.isfinite(hist.rows[1]["loss"])


def test_a_diverging_run_stops_with_a_clear_error(tmp_path):
    cfg = TrainConfig(epochs=1, batch_size=8, seed=0)
    bad = torch.full((len(CLASSES), 16), float("nan"))
    tr = _trainer(tmp_path, cfg, text_emb=bad)
    with pytest.raises(ModelError, match="diverged.*lower --lr"):
        tr.fit()


def test_log_lines_number_epochs_from_one():
    row0 = {"epoch": 0, "loss": 2.5, "temperature": 0.07, "val_t2i_R@1": 0.25}
    assert format_row(row0, epochs=3).startswith("before training | loss 2.5000 | T 0.0700")
    assert format_row({"epoch": 1, "loss": 2.0, "temperature": 0.07}, epochs=3).startswith(
        "epoch 1/3 | loss 2.0000")
    assert format_row({"epoch": 2, "temperature": 0.07}).startswith("epoch 2 | T 0.0700")
