"""Encoder interface, registry and safe checkpoint loading (tiny random open_clip models)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from rscir.encoders import default_registry, load_encoder
from rscir.errors import ModelMismatchError, ModelUnavailableError, UntrustedFileError


def test_interface_contract(tiny_encoder) -> None:
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 255, (50 + i, 70, 3), dtype=np.uint8) for i in range(3)]
    e1 = tiny_encoder.encode_images(imgs)
    assert e1.dtype == np.float32 and e1.shape == (3, tiny_encoder.dim)
    np.testing.assert_allclose(np.linalg.norm(e1, axis=1), 1.0, atol=1e-5)
    t = tiny_encoder.encode_texts(["a pool", "kidney-shaped", "with boats"])
    assert t.dtype == np.float32 and t.shape == (3, tiny_encoder.dim)
    np.testing.assert_allclose(np.linalg.norm(t, axis=1), 1.0, atol=1e-5)
    # deterministic, batch-size independent, picklable preprocessing (for loader workers)
    tiny_encoder.batch_size = 2
    np.testing.assert_allclose(tiny_encoder.encode_images(imgs), e1, atol=1e-5)
    tiny_encoder.batch_size = 64
    pickle.loads(pickle.dumps(tiny_encoder.preprocess))
    assert tiny_encoder.encode_images([]).shape == (0, tiny_encoder.dim)


def test_seeded_random_init_is_reproducible(tiny_encoder) -> None:
    again = load_encoder("rscir-tiny", device="cpu")
    assert again.info.fingerprint == tiny_encoder.info.fingerprint
    np.testing.assert_array_equal(again.encode_texts(["x"]), tiny_encoder.encode_texts(["x"]))


def test_local_checkpoint_roundtrip(tmp_path: Path, tiny_encoder) -> None:
    ckpt = tmp_path / "tiny.pt"
    sd = tiny_encoder.model.state_dict()
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, ckpt)
    enc = load_encoder(arch="RSCIR-Tiny", checkpoint=str(ckpt), device="cpu")
    assert enc.info.arch == "RSCIR-Tiny" and enc.info.source == str(ckpt.resolve())
    assert enc.info.fingerprint.startswith("sha256:") and enc.info.fingerprint != tiny_encoder.info.fingerprint
    np.testing.assert_allclose(enc.encode_texts(["a pool"]), tiny_encoder.encode_texts(["a pool"]), atol=1e-6)
    # a named registry model can take its weights from a local file too
    named = load_encoder("rscir-tiny", checkpoint=str(ckpt), device="cpu")
    assert named.info.name == "rscir-tiny" and named.info.fingerprint == enc.info.fingerprint


def test_bad_checkpoints(tmp_path: Path) -> None:
    with pytest.raises(ModelUnavailableError, match="not found"):
        load_encoder(arch="RSCIR-Tiny", checkpoint=str(tmp_path / "missing.pt"))
    wrong = tmp_path / "wrong.pt"
    torch.save({"visual.proj": torch.zeros(3, 3)}, wrong)
    with pytest.raises(ModelMismatchError, match="does not fit"):
        load_encoder(arch="RSCIR-Tiny", checkpoint=str(wrong))

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    evil = tmp_path / "evil.pt"
    with open(evil, "wb") as f:
        pickle.dump({"x": Evil()}, f)
    with pytest.raises(UntrustedFileError, match="plain Python pickle"):
        load_encoder(arch="RSCIR-Tiny", checkpoint=str(evil))


def test_registry_names_and_offline_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    reg = default_registry()
    for name in ("clip-vit-b-32", "clip-vit-l-14", "remoteclip-rn50", "remoteclip-vit-b-32",
                 "remoteclip-vit-l-14", "rscir-tiny"):
        assert name in reg.names()
    spec = reg.specs["remoteclip-vit-l-14"]
    assert (spec.arch, spec.hub_repo, spec.hub_file) == (
        "ViT-L-14", "chendelong/RemoteCLIP", "RemoteCLIP-ViT-L-14.pt")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ModelUnavailableError, match="--checkpoint"):
        load_encoder("remoteclip-rn50")
    with pytest.raises(ModelUnavailableError, match="unknown model"):
        load_encoder("no-such-model")
    with pytest.raises(ModelUnavailableError, match="needs --checkpoint"):
        load_encoder(arch="ViT-B-32")
    with pytest.raises(ModelUnavailableError, match="unknown open_clip architecture"):
        load_encoder(arch="NoSuchArch", checkpoint=str(tmp_path / "x.pt"))
