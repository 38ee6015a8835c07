"""rscir-mini: the embedded default model passes the encoder interface and knows some RS words."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, shared_data_dir
from PIL import Image

from rscir.encoders import default_registry, load_encoder
from rscir.encoders.mini import MiniEncoder, packaged_weights
from rscir.errors import ModelUnavailableError, UntrustedFileError

torch.set_num_threads(1)


def _shared_data() -> Path:
    return shared_data_dir()


@pytest.fixture(scope="module")
def mini() -> MiniEncoder:
    enc = load_encoder(device="cpu")  # no name: the registry default
    assert isinstance(enc, MiniEncoder)
    return enc


def test_weights_ship_and_it_is_the_default() -> None:
    w = packaged_weights()
    assert w is not None and w.is_file(), "rscir/weights/rscir-mini.safetensors must ship"
    assert w.stat().st_size < 20 * 2**20
    reg = default_registry()
    assert reg.default_model == "rscir-mini" and "rscir-mini" in reg.names()
    assert reg.specs["rscir-mini"].backend == "rscir-mini"


def test_model_card_recipe_matches_the_shipped_weights() -> None:
    """The model card's `rscir train` command parses, its settings are those recorded in the
    shipped weights, and the card's headline held-out numbers are the weights' own."""
    import re
    import shlex
    from dataclasses import asdict

    from safetensors import safe_open

    from rscir.cli import build_parser
    from rscir.cli.train import configs
    from rscir.encoders.towers import TowerConfig

    card = (REPO / "docs" / "MODEL_CARD_rscir-mini.md").read_text()
    block = re.search(r"```bash\n(rscir train runs/rscir-mini .*?)```", card, re.S)
    assert block, "the model card must give the training command"
    args = build_parser().parse_args(shlex.split(block.group(1).replace("\\\n", " "))[1:])
    assert args.install == "src/rscir/weights/rscir-mini.safetensors"
    tower, train = configs(args)
    with safe_open(str(packaged_weights()), "pt") as f:
        meta = f.metadata()
    assert TowerConfig.from_json(meta["tower"]) == tower
    assert json.loads(meta["train_config"]) == asdict(train)
    last = json.loads(meta["history"])[-1]
    row = re.search(r"\*\*rscir-mini\*\*.*", card).group(0)
    for k in ("t2i_R@1", "t2i_R@5", "t2i_R@10", "i2i_mAP"):
        assert f"**{last[f'test_{k}']:.3f}**" in row, k


def test_interface_contract(mini: MiniEncoder) -> None:
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 255, (50 + 7 * i, 70, 3), dtype=np.uint8) for i in range(3)]
    imgs.append(Image.fromarray(imgs[0]))  # PIL and array give the same embedding
    e1 = mini.encode_images(imgs)
    assert e1.dtype == np.float32 and e1.shape == (4, 384) and mini.dim == 384
    np.testing.assert_allclose(np.linalg.norm(e1, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(e1[3], e1[0], atol=1e-6)
    t = mini.encode_texts(["a pool", "kidney-shaped", "with boats"])
    assert t.dtype == np.float32 and t.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(t, axis=1), 1.0, atol=1e-5)
    # deterministic and batch-size independent
    mini.batch_size = 2
    np.testing.assert_allclose(mini.encode_images(imgs), e1, atol=1e-5)
    mini.batch_size = 64
    np.testing.assert_array_equal(mini.encode_texts(["a pool"]), mini.encode_texts(["a pool"]))
    # picklable preprocess (DataLoader workers) that agrees with encode_images
    pre = pickle.loads(pickle.dumps(mini.preprocess))
    batch = mini.collate([pre(Image.fromarray(a)) for a in imgs[:3]])
    np.testing.assert_allclose(mini.encode_preprocessed(batch), e1[:3], atol=1e-5)
    assert mini.encode_images([]).shape == (0, 384)
    assert mini.encode_texts([]).shape == (0, 384)
    info = mini.info
    assert info.name == "rscir-mini" and info.backend == "rscir-mini" and info.dim == 384
    assert info.fingerprint.startswith("sha256:") and "all-MiniLM-L6-v2" in info.arch
    assert info.same_space(load_encoder("rscir-mini", device="cpu").info)


def test_text_tower_is_minilm(mini: MiniEncoder) -> None:
    """Paraphrases sit closer than unrelated sentences (a real sentence encoder, not random)."""
    t = mini.encode_texts(["many boats in a harbor", "ships docked at a port", "a green forest"])
    assert t[0] @ t[1] > t[0] @ t[2] + 0.2


def test_bad_weights_files(tmp_path: Path) -> None:
    with pytest.raises(ModelUnavailableError, match="not found"):
        load_encoder("rscir-mini", checkpoint=str(tmp_path / "missing.safetensors"))
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(UntrustedFileError, match="not an rscir-mini tower file"):
        load_encoder("rscir-mini", checkpoint=str(junk))


def test_real_images_match_their_class_text(mini: MiniEncoder) -> None:
    """On UCM test-split images (never trained on), the right class sentence beats the others
    for most images: the model has learned some remote-sensing vocabulary."""
    data = _shared_data()
    caps = data / "ucm16" / "captions.jsonl"
    if not caps.is_file():
        pytest.skip(f"real data not found at {data} (set RSCIR_SHARED_DATA)")
    rows = [json.loads(x) for x in caps.read_text().splitlines() if x.strip()]
    test = [r["image"] for r in rows if r["split"] == "test"]
    classes = {"agricultural": "farmland", "airplane": "an airplane", "beach": "a beach",
               "harbor": "a harbor with boats", "parkinglot": "a parking lot with cars",
               "storagetanks": "storage tanks", "tenniscourt": "a tennis court",
               "river": "a river"}
    picked = [p for p in test if p.split("/")[0] in classes]
    imgs = [Image.open(data / "ucm16" / "images" / p) for p in picked]
    names = list(classes)
    t = mini.encode_texts([f"an aerial image of {classes[c]}" for c in names])
    pred = (mini.encode_images(imgs) @ t.T).argmax(axis=1)
    truth = np.array([names.index(p.split("/")[0]) for p in picked])
    acc = float((pred == truth).mean())
    assert len(picked) >= 40 and acc > 0.5, acc  # chance is 1/8
