"""The CLI end to end: index, search (text, JSON, contact sheet, λ rows), info, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from rscir.cli import main
from rscir.cli.core import parse_lams


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_parse_lams() -> None:
    assert parse_lams("0.5") == [0.5]
    assert parse_lams("0,0.25,1") == [0, 0.25, 1]
    assert parse_lams("0:1:0.25") == [0, 0.25, 0.5, 0.75, 1]
    assert len(parse_lams("0:1:0.1")) == 11


def test_cli_index_search_info(tmp_path: Path, image_folder: Path, capsys) -> None:
    store = tmp_path / "store"
    rc, out, _ = run(capsys, "index", str(image_folder), "--store", str(store), "--model",
                     "rscir-tiny", "--no-progress", "--workers", "0", "--device", "cpu")
    assert rc == 0 and "indexed 16" in out
    rc, out, _ = run(capsys, "index", str(image_folder), "--store", str(store), "--no-progress",
                     "--workers", "0")
    assert rc == 0 and "indexed 0" in out and "16 already indexed" in out
    q = image_folder / "forest" / "forest01.jpg"
    rc, out, _ = run(capsys, "search", str(store), "--image", str(q), "--text", "denser",
                     "--lam", "0.3", "-k", "4", "--json")
    assert rc == 0
    res = json.loads(out)
    hits = res["results"][0]["hits"]
    assert res["results"][0]["lam"] == 0.3 and len(hits) == 4
    assert set(hits[0]) >= {"rank", "id", "path", "score"}
    assert all(not Path(h["path"]).is_absolute() and (image_folder / h["path"]).exists() for h in hits)
    assert "forest/forest01.jpg" not in [h["path"] for h in hits]
    sheet = tmp_path / "sheet.png"
    rc, out, err = run(capsys, "search", str(store), "--item-id", "3", "--text", "with boats",
                       "--lams", "0,0.5,1", "-k", "5", "--sheet", str(sheet))
    assert rc == 0 and out.count("# method=weicom") == 3
    im = Image.open(sheet)
    assert im.width > 5 * 128 and im.height > 3 * 128
    rc, out, _ = run(capsys, "info", str(store), "--json")
    info = json.loads(out)
    assert info["items"] == 16 and info["model"]["name"] == "rscir-tiny" and info["classes"] == 3


def test_cli_errors_are_clean(tmp_path: Path, image_folder: Path, capsys) -> None:
    rc, _, err = run(capsys, "index", str(tmp_path / "missing"), "--store", str(tmp_path / "s"),
                     "--model", "rscir-tiny")
    assert rc == 2 and "archive folder not found" in err
    rc, _, err = run(capsys, "search", str(tmp_path / "nostore"), "--text", "x")
    assert rc == 2 and "no store" in err
    store = tmp_path / "s2"
    assert run(capsys, "index", str(image_folder), "--store", str(store), "--model", "rscir-tiny",
               "--no-progress", "--workers", "0")[0] == 0
    rc, _, err = run(capsys, "search", str(store), "--image", str(tmp_path / "nope.jpg"), "--text", "x")
    assert rc == 2 and "not found" in err
    rc, _, err = run(capsys, "search", str(store), "--image",
                     str(image_folder / "beach" / "beach01.jpg"), "--method", "weicom")
    assert rc == 2 and "needs a text modifier: give --text" in err
    rc, _, err = run(capsys, "search", str(store), "--item-id", "999", "--text", "x")
    assert rc == 2 and "unknown item id" in err
    rc, _, err = run(capsys, "search", str(store), "--item-id", "1", "--text", "x", "--lam", "2")
    assert rc == 2 and "lambda" in err
    rc, _, err = run(capsys, "index", str(image_folder), "--store", str(store), "--model",
                     "remoteclip-rn50")
    assert rc == 2 and "--checkpoint" in err
    before = (store / "state.json").read_text()
    # another model on the same store: refused, nothing changed
    ck = tmp_path / "other.pt"
    import torch

    from rscir.encoders import load_encoder

    enc = load_encoder("rscir-tiny", device="cpu")
    sd = {k: v + 0.01 if v.is_floating_point() else v for k, v in enc.model.state_dict().items()}
    torch.save(sd, ck)
    rc, _, err = run(capsys, "index", str(image_folder), "--store", str(store), "--arch",
                     "RSCIR-Tiny", "--checkpoint", str(ck), "--workers", "0")
    assert rc == 2 and "was built with model" in err
    assert (store / "state.json").read_text() == before


def test_cli_index_precision(tmp_path: Path, image_folder: Path, capsys) -> None:
    """--precision bf16 gives an open_clip store within bf16 rounding of the fp32 one; a model
    without a lossy path says so instead of ignoring the flag, and writes nothing."""
    import numpy as np

    from rscir.stores import DirectoryStore

    for prec in ("fp32", "bf16"):
        rc, _, err = run(capsys, "index", str(image_folder), "--store", str(tmp_path / prec),
                         "--model", "rscir-tiny", "--no-progress", "--workers", "0",
                         "--device", "cpu", "--precision", prec)
        assert rc == 0, err
    a, b = (np.asarray(DirectoryStore.open(tmp_path / p).embeddings, np.float32)
            for p in ("fp32", "bf16"))
    diff = float(np.abs(a - b).max())
    assert 0 < diff < 0.05  # bf16 keeps 8 bits of mantissa: different, but close
    rc, _, err = run(capsys, "index", str(image_folder), "--store", str(tmp_path / "mini"),
                     "--model", "classic", "--no-progress", "--precision", "int8")
    assert rc == 2 and "fp32 only" in err and "--precision" in err
    assert not (tmp_path / "mini").exists()
