"""rscir-mini opens without torch: its identity comes from the weights file's metadata and must
equal what the loaded tower says (stores record it), for every kind of tower."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO
from PIL import Image

from rscir.encoders.mini import MiniEncoder, packaged_weights
from rscir.encoders.minilm import MiniLMText
from rscir.encoders.tower_meta import TowerConfig, input_repr, read_tower_meta
from rscir.encoders.towers import build_tower, export_tower, load_tower

torch.set_num_threads(1)


def _eager_transform_and_arch(weights: Path) -> tuple[str, str]:
    tower, _ = load_tower(weights)
    return repr(tower.input), tower.arch_name


def test_packaged_model_identity_without_loading() -> None:
    w = packaged_weights()
    assert w is not None
    enc = MiniEncoder(w, device="cpu")
    assert enc._tower is None and enc.text._model is None  # nothing loaded yet
    transform, arch = _eager_transform_and_arch(w)
    assert enc.info.preprocessing["transform"] == transform == "DescriptorInput({})"
    assert enc.info.arch == f"rscir-mini:{arch}+all-MiniLM-L6-v2"
    assert enc.info.preprocessing["tower"] == load_tower(w)[0].config.to_json()


@pytest.mark.parametrize("cfg", [
    TowerConfig(kind="cnn", embed_dim=384, image_size=32, pad=4, width=8, hidden=64),
    TowerConfig(kind="descriptor", embed_dim=384, hidden=32),
    TowerConfig(kind="open_clip", embed_dim=384, arch="RSCIR-Tiny",
                init_checkpoint="/nonexistent/init.pt"),
], ids=["cnn", "descriptor", "open_clip"])
def test_every_tower_kind(tmp_path: Path, cfg: TowerConfig) -> None:
    torch.manual_seed(0)
    tower = build_tower(replace(cfg, init_checkpoint=None))
    tower.config = cfg  # a tower fine-tuned from open_clip weights records where they came from
    path = export_tower(tower, tmp_path / "model.safetensors",
                        text={"name": MiniLMText.name, "fingerprint": MiniLMText.fingerprint()})
    meta_cfg, _ = read_tower_meta(path)
    assert meta_cfg.init_checkpoint is None  # weights come from the file, as load_tower says
    enc = MiniEncoder(path, device="cpu")
    transform, arch = _eager_transform_and_arch(path)
    assert enc.info.preprocessing["transform"] == transform
    assert enc.info.arch.split(":", 1)[1] == f"{arch}+all-MiniLM-L6-v2"
    assert (input_repr(meta_cfg) is None) == (cfg.kind == "open_clip")
    x = np.random.default_rng(0).integers(0, 255, (2, 40, 40, 3), dtype=np.uint8)
    got = enc.encode_images(list(x))
    eager = load_tower(path)[0].eval()
    with torch.no_grad():
        batch = torch.stack([eager.input(Image.fromarray(a)) for a in x])
        want = torch.nn.functional.normalize(eager(batch), dim=-1).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_default_model_never_imports_torch(tmp_path: Path) -> None:
    """The default model (a descriptor tower) embeds texts and images in numpy, and its
    embeddings are those of the torch tower (and of sentence-transformers' MiniLM)."""
    code = (
        "import json, sys\n"
        "from rscir.encoders import load_encoder\n"
        "enc = load_encoder('rscir-mini', device='cpu')\n"
        "t = enc.encode_texts(['a harbor with boats'])\n"
        "before = sorted(m for m in ('torch', 'skimage') if m in sys.modules)\n"
        "import numpy as np\n"
        "i = enc.encode_images([np.full((50, 60, 3), 90, np.uint8)])\n"
        "print(json.dumps([before, 'torch' in sys.modules, t[0].tolist(), i[0].tolist()]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                         env={**os.environ, "RSCIR_TEXT_CACHE": "0"}, check=True)
    before, after, t, i = json.loads(out.stdout)
    assert before == [] and after is False
    w = packaged_weights()
    assert w is not None
    tower = load_tower(w)[0].eval()  # the torch module `rscir train` wrote
    with torch.no_grad():
        x = tower.input(Image.fromarray(np.full((50, 60, 3), 90, np.uint8)))[None]
        want = torch.nn.functional.normalize(tower(x), dim=-1)[0].numpy()
    np.testing.assert_allclose(i, want, atol=1e-5)
    np.testing.assert_allclose(t, MiniLMText().encode(["a harbor with boats"])[0], atol=1e-6)


def test_warm_up_loads_both_towers(tmp_path: Path) -> None:
    w = packaged_weights()
    assert w is not None
    enc = MiniEncoder(w, device="cpu")
    enc.warm_up()
    assert enc._mlp is not None and enc._features._descriptor is not None
    assert enc.text._model is not None
    torch.manual_seed(0)
    path = export_tower(build_tower(TowerConfig(kind="cnn", image_size=16, width=4, hidden=8)),
                        tmp_path / "cnn.safetensors")
    cnn = MiniEncoder(path, device="cpu")
    cnn.warm_up()
    assert cnn._tower is not None and cnn.text._model is not None


def test_descriptor_weights_that_do_not_fit(tmp_path: Path) -> None:
    """The metadata opens the model; weights that do not fit fail on the first image with
    ModelMismatchError (the numpy tower checks what torch's strict loading checked)."""
    from safetensors.numpy import load_file, save_file

    from rscir.errors import ModelMismatchError

    w = packaged_weights()
    assert w is not None
    from safetensors import safe_open

    with safe_open(str(w), "np") as f:
        meta = dict(f.metadata())
    sd = load_file(str(w))
    img = [np.full((40, 40, 3), 100, np.uint8)]
    for name, broken in [
        ("missing", {k: v for k, v in sd.items() if k != "net.net.6.weight"}),
        ("shape", {**sd, "net.net.3.weight": np.ascontiguousarray(sd["net.net.3.weight"][:, :9])}),
    ]:
        path = tmp_path / f"{name}.safetensors"
        save_file(broken, str(path), metadata=meta)
        enc = MiniEncoder(path, device="cpu")
        with pytest.raises(ModelMismatchError, match="do not fit"):
            enc.encode_images(img)
