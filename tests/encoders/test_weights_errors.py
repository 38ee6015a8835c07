"""Weights files are untrusted: every format problem (garbage, a pickle under any name, objects
besides tensors, truncation, the wrong kind of file) is one rscir line that names the fix, never
torch's or safetensors' own advice, and nothing in the file runs. Good files load by content,
whatever their extension."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from rscir.cli import main
from rscir.encoders.openclip import load_state_dict, weights_format
from rscir.encoders.towers import load_tower
from rscir.errors import ModelMismatchError, ModelUnavailableError, UntrustedFileError

FOREIGN = ("weights_only", "Please file an issue", "pytorch.org", "If you are seeing this",
           "Traceback", "SafetensorError")


class _Run:
    def __init__(self, fn, *args) -> None:
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def one_rscir_line(msg: str) -> None:
    assert "\n" not in msg and not any(f in msg for f in FOREIGN), msg


@pytest.fixture()
def files(tmp_path: Path) -> dict[str, Path]:
    """Bad weights files, each a classic way to get it wrong; 'marker' appears if code ran."""
    marker = tmp_path / "pwned"
    evil = pickle.dumps({"w": _Run(os.system, f"touch {marker}")})
    good = {"w": torch.arange(6.0).reshape(2, 3)}
    out = {}

    def put(name: str, data: bytes) -> None:
        (tmp_path / name).write_bytes(data)
        out[name] = tmp_path / name

    rnd = os.urandom(4096)
    put("garbage.pt", rnd)
    put("garbage.bin", rnd)
    put("garbage.safetensors", rnd)
    put("pickle.pt", evil)
    put("pickle.safetensors", evil)  # a pickle under the safer name
    torch.save({"w": _Run(os.system, f"touch {marker}")}, tmp_path / "objects.pt")
    out["objects.pt"] = tmp_path / "objects.pt"
    torch.save(good, tmp_path / "good.pt")
    put("truncated.pt", (tmp_path / "good.pt").read_bytes()[:300])
    save_file(good, str(tmp_path / "good.safetensors"))
    put("truncated.safetensors", (tmp_path / "good.safetensors").read_bytes()[:-8])
    out["good.pt"] = tmp_path / "good.pt"
    out["good.safetensors"] = tmp_path / "good.safetensors"
    out["marker"] = marker
    return out


@pytest.mark.parametrize("name, says", [
    ("garbage.pt", "is not a weights file"),
    ("garbage.bin", "is not a weights file"),
    ("garbage.safetensors", "is not a weights file"),
    ("pickle.pt", "plain Python pickle"),
    ("pickle.safetensors", "plain Python pickle"),
    ("objects.pt", "holds Python objects besides tensors (it refers to the Python object"),
    ("truncated.pt", "damaged PyTorch checkpoint"),
    ("truncated.safetensors", "damaged safetensors file"),
])
def test_open_clip_checkpoint_errors(files, name: str, says: str) -> None:
    with pytest.raises(UntrustedFileError) as e:
        load_state_dict(files[name])
    msg = str(e.value)
    one_rscir_line(msg)
    assert says in msg and str(files[name]) in msg
    fix = ("--checkpoint takes", "torch.save(model.state_dict()", "download or copy it again")
    assert any(f in msg for f in fix), msg
    assert not files["marker"].exists()


def test_files_load_by_content_not_name(tmp_path: Path) -> None:
    """The same state dict as zip .pt, legacy torch.save, .safetensors, and each renamed; a
    {'state_dict': ...} wrapper with DataParallel prefixes too."""
    sd = {"a.weight": torch.randn(3, 2), "b": torch.arange(4)}
    torch.save(sd, tmp_path / "zip.pt")
    torch.save(sd, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    save_file(sd, str(tmp_path / "st.safetensors"))
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3},
               tmp_path / "wrapped.bin")
    (tmp_path / "st.bin").write_bytes((tmp_path / "st.safetensors").read_bytes())
    (tmp_path / "zip.safetensors").write_bytes((tmp_path / "zip.pt").read_bytes())
    kinds = {"zip.pt": "torch", "legacy.pt": "torch", "st.safetensors": "safetensors",
             "wrapped.bin": "torch", "st.bin": "safetensors", "zip.safetensors": "torch"}
    for name, kind in kinds.items():
        assert weights_format(tmp_path / name) == kind, name
        got = load_state_dict(tmp_path / name)
        assert got.keys() == sd.keys() and all(torch.equal(got[k], sd[k]) for k in sd), name


def test_not_a_state_dict_and_missing(tmp_path: Path) -> None:
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    with pytest.raises(ModelMismatchError, match="does not hold a state dict") as e:
        load_state_dict(tmp_path / "list.pt")
    one_rscir_line(str(e.value))
    with pytest.raises(ModelUnavailableError, match="not found"):
        load_state_dict(tmp_path / "nope.pt")
    with pytest.raises(ModelUnavailableError, match="is a folder"):
        load_state_dict(tmp_path)


@pytest.mark.parametrize("name", ["garbage.pt", "pickle.safetensors", "objects.pt",
                                  "truncated.safetensors"])
def test_cli_prints_one_line(files, image_folder, tmp_path, capsys, name: str) -> None:
    rc = main(["index", str(image_folder), "--store", str(tmp_path / "s"), "--arch", "RSCIR-Tiny",
               "--checkpoint", str(files[name]), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("rscir index: error: ") and err.count("\n") == 1, err
    one_rscir_line(err.strip())
    assert not files["marker"].exists()


# ----------------------------------------------------------------------------- rscir-mini towers
def _tower_file() -> Path:
    from rscir.encoders.mini import packaged_weights

    p = packaged_weights()
    if p is None:
        pytest.skip("the rscir-mini weights are not installed")
    return p


@pytest.mark.parametrize("name, says", [
    ("good.pt", "is a PyTorch checkpoint, not an rscir-mini tower file"),
    ("garbage.safetensors", "is not an rscir-mini tower file"),
    ("pickle.safetensors", "is not an rscir-mini tower file"),
    ("good.safetensors", "is a safetensors file but not an rscir-mini tower"),
])
def test_tower_file_errors(files, name: str, says: str) -> None:
    path = files[name]
    with pytest.raises(UntrustedFileError) as e:
        load_tower(path)
    msg = str(e.value)
    one_rscir_line(msg)
    assert says in msg and "model.safetensors written by `rscir train`" in msg
    if name.endswith(".pt"):
        assert f"--arch ARCH --checkpoint {path}" in msg
    assert not files["marker"].exists()


def test_damaged_tower_files(tmp_path: Path) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file

    src = _tower_file()
    data = src.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-1000])
    with pytest.raises(UntrustedFileError, match="damaged safetensors file") as e:
        load_tower(tmp_path / "cut.safetensors")
    one_rscir_line(str(e.value))

    sd = load_file(str(src))
    with safe_open(str(src), "pt") as f:
        meta = dict(f.metadata())
    save_file(sd, str(tmp_path / "badmeta.safetensors"), metadata={**meta, "tower": "{oops"})
    with pytest.raises(UntrustedFileError, match="tower description cannot be read") as e:
        load_tower(tmp_path / "badmeta.safetensors")
    one_rscir_line(str(e.value))

    first = next(iter(sd))
    save_file({**sd, first: torch.zeros(1, 2, 3)}, str(tmp_path / "shape.safetensors"),
              metadata=meta)
    with pytest.raises(ValueError, match=f"size mismatch for {first}") as e:
        load_tower(tmp_path / "shape.safetensors")
    one_rscir_line(str(e.value))

    save_file({"x": torch.zeros(1)}, str(tmp_path / "keys.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match=r"missing \[.*unexpected \['x'\]") as e:
        load_tower(tmp_path / "keys.safetensors")
    one_rscir_line(str(e.value))


def test_cli_rscir_mini_with_an_open_clip_checkpoint(files, image_folder, tmp_path,
                                                     capsys) -> None:
    _tower_file()
    rc = main(["index", str(image_folder), "--store", str(tmp_path / "s"), "--model",
               "rscir-mini", "--checkpoint", str(files["good.pt"]), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "--arch ARCH --checkpoint" in err, err
