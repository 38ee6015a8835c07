"""`rscir index --ray`: a Ray Data pipeline that must build the same store as the local path,
report bad files, survive a dead encoder actor, resume after its driver is killed, and write to
the Postgres store as well. One local Ray instance (2 CPUs, small object store) serves the module.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import local_ray, make_image_folder

from rscir.cli import main
from rscir.encoders import ModelRegistry, default_registry
from rscir.errors import RscirError
from rscir.ingest import index_folder
from rscir.ingest.ray_data import (
    BLOCK_BYTES,
    EncoderSpec,
    _block_rows,
    index_folder_ray,
    plan_placement,
)
from rscir.moments import Moments
from rscir.stores import DirectoryStore

ray = pytest.importorskip("ray")

META = ["path", "size", "mtime_ns", "width", "height", "label"]


# --------------------------------------------------------------------------- pure planning
def test_plan_placement() -> None:
    p = plan_placement({"CPU": 32.0, "GPU": 4.0})
    assert (p.encoders, p.device, p.gpus_per_encoder) == (4, "cuda", 1.0)
    p = plan_placement({"CPU": 32.0, "GPU": 4.0}, device="cpu")
    assert (p.encoders, p.device, p.gpus_per_encoder) == (32, "cpu", 0.0)
    assert plan_placement({"CPU": 2.0}).encoders == 2  # CPU encoders decode their own units
    assert plan_placement({"CPU": 8.0}, cpus_per_encoder=2.0).encoders == 4
    assert plan_placement({"CPU": 8.0}, num_encoders=3).encoders == 3
    with pytest.raises(RscirError, match="no GPUs"):
        plan_placement({"CPU": 8.0}, device="cuda")
    with pytest.raises(ValueError):
        plan_placement({"CPU": 8.0}, num_encoders=0)


def test_block_rows() -> None:
    vit = 3 * 224 * 224 * 4  # float32 ViT input: 602,112 bytes
    assert _block_rows(10_000_000, 64, vit) == BLOCK_BYTES // vit == 55  # bounded by bytes
    assert _block_rows(1600, 2, 3 * 64 * 64 * 4) == 200  # 4 blocks per core
    assert _block_rows(3, 16, vit) == 1
    assert _block_rows(1, 1, 10 * BLOCK_BYTES) == 1


# --------------------------------------------------------------------------- Ray session
@pytest.fixture(scope="module")
def ray_address() -> Iterator[str]:
    # this module's helpers (registry factories) travel to workers by value
    with local_ray(by_value=sys.modules[__name__]) as address:
        yield address


@pytest.fixture(scope="module")
def ucm16(shared_data: Path) -> Path:
    return shared_data / "ucm16" / "images"


@pytest.fixture(scope="module")
def local_ucm16(tmp_path_factory: pytest.TempPathFactory, ucm16: Path, tiny_encoder) -> DirectoryStore:
    """The single-process reference store of ucm16 with rscir-tiny."""
    d = tmp_path_factory.mktemp("local") / "s"
    index_folder(ucm16, d, tiny_encoder, num_workers=1, progress=False)
    return DirectoryStore.open(d)


def assert_same_items(got: DirectoryStore, ref: DirectoryStore) -> None:
    """Same rows by path (metadata and embeddings to float16 tolerance) and merged moments."""
    rows = ref.rows_for_paths(got.items["path"].tolist())
    assert (rows >= 0).all(), "an item the reference does not have"
    a = got.items[META].reset_index(drop=True)
    b = ref.items[META].iloc[rows].reset_index(drop=True)
    pd.testing.assert_frame_equal(a, b)
    assert [list(x) for x in got.items["labels"]] == [list(ref.items["labels"].iloc[r])
                                                       for r in rows]
    e_got = np.asarray(got.embeddings, np.float32)
    e_ref = np.asarray(ref.embeddings, np.float32)[rows]
    np.testing.assert_allclose(e_got, e_ref, atol=2e-3, rtol=0)
    m = got.moments()
    direct = Moments.of(got.embeddings)
    assert m.n == len(got) == direct.n
    np.testing.assert_allclose(m.sum, direct.sum, atol=1e-6)
    np.testing.assert_allclose(m.sumsq, direct.sumsq, atol=1e-6)


# --------------------------------------------------------------------------- ucm16: kill + resume
KILL_SCRIPT = r"""
import sys, time
from rscir.ingest.ray_data import index_folder_ray
from rscir.encoders import default_registry

def slow_registry():  # a slow model, so the kill lands mid-run
    reg = default_registry()
    load = reg.loaders["open_clip"]
    def slow_load(spec, opts):
        enc = load(spec, opts)
        fast = enc.encode_preprocessed
        def slow(batch):
            time.sleep(0.1)
            return fast(batch)
        enc.encode_preprocessed = slow
        return enc
    reg.register_backend("open_clip", slow_load)
    return reg

index_folder_ray(sys.argv[1], sys.argv[2], model="rscir-tiny", address=sys.argv[3],
                 batch_size=8, segment_size=16, progress=False, registry_factory=slow_registry)
"""


@pytest.mark.realdata
def test_ray_index_resumes_after_driver_killed_and_equals_local(
    tmp_path: Path, ray_address: str, ucm16: Path, local_ucm16: DirectoryStore, capsys
) -> None:
    """`--ray` indexing of ucm16, its driver killed (-9) mid-run and rerun from the CLI, gives
    the single-process store: the same items and embeddings, none lost, none twice."""
    store = tmp_path / "ray"
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(ucm16), str(store),
                             ray_address], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = store / "state.json"
    deadline = time.time() + 150
    try:  # wait until at least two segments are committed, then kill the driver mid-run
        while time.time() < deadline and proc.poll() is None:
            if state.exists() and state.read_text().count("seg-") >= 2:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the driver finished (or failed) before it could be killed"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    partial = len(DirectoryStore.open(store))
    assert 0 < partial < 1600

    rc = main(["index", str(ucm16), "--store", str(store), "--ray", ray_address,
               "--no-progress", "--json", "--segment-size", "512"])
    assert rc == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["already_indexed"] == partial and rep["embedded"] == 1600 - partial
    assert rep["bad"] == [] and rep["total_items"] == 1600
    st = DirectoryStore.open(store)
    assert len(st) == len(local_ucm16) == 1600 and st.items["path"].is_unique
    assert sorted(st.ids.tolist()) == list(range(1600))
    assert st.info()["segments"] == 1  # compacted after the run, like the local path
    assert_same_items(st, local_ucm16)
    np.testing.assert_allclose(st.moments().sumsq, local_ucm16.moments().sumsq, atol=1e-3)


# --------------------------------------------------------------------------- bad files
def _bad_archive(root: Path) -> tuple[Path, dict[str, str]]:
    folder = make_image_folder(root, {"beach": 5, "forest": 4})
    good = (folder / "beach" / "beach01.jpg").read_bytes()
    (folder / "beach" / "corrupt.jpg").write_bytes(b"definitely not an image file")
    (folder / "forest" / "empty.png").write_bytes(b"")
    (folder / "forest" / "truncated.jpg").write_bytes(good[: len(good) // 3])
    (folder / "forest" / "notes.txt").write_text("not an image")
    reasons = {"beach/corrupt.jpg": "not an image", "forest/empty.png": "empty file",
               "forest/truncated.jpg": "truncated"}
    return folder, reasons


def test_bad_files_reported_and_skipped(tmp_path: Path, ray_address: str, tiny_encoder,
                                        capsys) -> None:
    folder, reasons = _bad_archive(tmp_path / "a")
    store = tmp_path / "s"
    args = ["index", str(folder), "--store", str(store), "--model", "rscir-tiny",
            "--ray", ray_address, "--no-progress", "--json"]
    assert main(args) == 0
    rep = json.loads(capsys.readouterr().out)
    bad = {b["path"]: b["reason"] for b in rep["bad"]}
    assert sorted(bad) == sorted(reasons)
    for path, why in reasons.items():
        assert why in bad[path], (path, bad[path])
    assert [b["path"] for b in rep["ignored"]] == ["forest/notes.txt"]
    assert rep["embedded"] == 9 and rep["total_items"] == 9
    csv = pd.read_csv(store / "reports" / "bad_files.csv")
    assert sorted(csv["path"]) == sorted(reasons)

    index_folder(folder, tmp_path / "local", tiny_encoder, num_workers=0, progress=False)
    assert_same_items(DirectoryStore.open(store), DirectoryStore.open(tmp_path / "local"))


# --------------------------------------------------------------------------- worker dies
def dying_registry(marker: str) -> ModelRegistry:
    """rscir-tiny whose first encoder process to embed anything dies (once, across restarts)."""
    reg = default_registry()
    load = reg.loaders["open_clip"]

    def load_dying(spec, opts):
        enc = load(spec, opts)
        fast = enc.encode_preprocessed

        def maybe_die(batch):
            try:
                fd = os.open(marker, os.O_CREAT | os.O_EXCL)
            except FileExistsError:
                return fast(batch)
            os.close(fd)
            os._exit(1)  # the whole actor process, mid-task

        enc.encode_preprocessed = maybe_die
        return enc

    reg.register_backend("open_clip", load_dying)
    return reg


def test_encoder_actor_dies_nothing_lost(tmp_path: Path, ray_address: str, tiny_encoder) -> None:
    import functools

    folder = make_image_folder(tmp_path / "a", {"c1": 12, "c2": 12})
    marker = tmp_path / "died"
    rep = index_folder_ray(folder, tmp_path / "s", model="rscir-tiny", address=ray_address,
                           batch_size=4, segment_size=8, progress=False,
                           registry_factory=functools.partial(dying_registry, str(marker)))
    assert marker.exists(), "the encoder never died: the test did not test anything"
    assert rep.embedded == 24 and not rep.bad
    st = DirectoryStore.open(tmp_path / "s")
    assert sorted(st.ids.tolist()) == list(range(24))
    index_folder(folder, tmp_path / "local", tiny_encoder, num_workers=0, progress=False)
    assert_same_items(st, DirectoryStore.open(tmp_path / "local"))


# --------------------------------------------------------------------------- Postgres store
def test_pg_store(tmp_path: Path, ray_address: str, pg_uri: str, tiny_encoder) -> None:
    from rscir.stores.postgres import PostgresStore

    folder, reasons = _bad_archive(tmp_path / "a")
    sep = "&" if "?" in pg_uri else "?"
    uri = f"{pg_uri}{sep}schema=ray_ingest_test"
    rep = index_folder_ray(folder, uri, model="rscir-tiny", address=ray_address,
                           segment_size=4, progress=False)
    assert rep.embedded == 9 and sorted(b.path for b in rep.bad) == sorted(reasons)
    index_folder(folder, tmp_path / "local", tiny_encoder, num_workers=0, progress=False)
    with PostgresStore.open(uri) as pg:
        assert_same_items(pg, DirectoryStore.open(tmp_path / "local"))  # type: ignore[arg-type]
        assert pg.has_hnsw()  # the pipeline finished the bulk load
    for path in reasons:  # without bad files a resume has nothing to decode: no pipeline
        (folder / path).unlink()
    rep = index_folder_ray(folder, uri, address=ray_address, progress=False)  # store's model
    assert rep.embedded == 0 and rep.already_indexed == 9 and rep.total_items == 9


def test_spec_is_picklable() -> None:
    """Encoder specs cross process boundaries; a spec must survive a pickle round trip."""
    spec = EncoderSpec("rscir-tiny", batch_size=8)
    again = ray.cloudpickle.loads(ray.cloudpickle.dumps(spec))
    assert again == spec and again.build("cpu").info.name == "rscir-tiny"
