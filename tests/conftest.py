"""Shared fixtures: the tiny random open_clip model, the real data folder, small image folders."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    env = os.environ.get("RSCIR_SHARED_DATA")
    return Path(env) if env else REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    d = shared_data_dir()
    if not (d / "ucm16" / "images").is_dir():
        pytest.skip(f"real images not found at {d} (set RSCIR_SHARED_DATA to ../shared/data)")
    return d


@pytest.fixture(scope="session")
def tiny_encoder():
    import torch

    torch.set_num_threads(min(2, torch.get_num_threads()))
    from rscir.encoders import load_encoder

    return load_encoder("rscir-tiny", device="cpu")


def make_image_folder(root: Path, classes: dict[str, int], size: int = 48, seed: int = 0) -> Path:
    """Class folders of small JPEG/PNG images whose colours depend on the class."""
    rng = np.random.default_rng(seed)
    for ci, (cls, n) in enumerate(sorted(classes.items())):
        d = root / cls
        d.mkdir(parents=True, exist_ok=True)
        base = np.array([(ci * 67) % 256, (ci * 131) % 256, (ci * 29) % 256], np.uint8)
        for i in range(n):
            arr = np.clip(base + rng.integers(-40, 40, (size, size, 3)), 0, 255).astype(np.uint8)
            ext = ".png" if i % 3 == 0 else ".jpg"
            Image.fromarray(arr).save(d / f"{cls}{i:02d}{ext}")
    return root


@pytest.fixture()
def image_folder(tmp_path: Path) -> Path:
    return make_image_folder(tmp_path / "archive", {"beach": 6, "forest": 5, "harbor": 5})
