"""`rscir index --ray`: the local ingestion path as a Ray Data pipeline over many machines/GPUs.

    list files (driver) ─► decode + preprocess (CPU tasks) ─► embed (actor pool, 1 GPU each)
                        ─► driver commits segments with ``store.add`` (one writer, atomic)

Why this shape:

* The same rules as :func:`rscir.ingest.index_folder`: the same file walk, decoder
  (:func:`~rscir.ingest.load_image`), preprocessing (the encoder's picklable ``preprocess``), item
  records and resume rule (path, size, mtime), so a Ray-built store equals a locally built one.
* Encoders are built *inside* each actor from a registry name/arch/checkpoint
  (:class:`EncoderSpec`), never shipped as pickled models; each actor checks it built the same
  embedding space (weights fingerprint) as the store.
* Only the driver writes, through the store's own atomic ``add`` (one segment per commit), so
  the store's guarantees hold unchanged: a killed driver loses at most the uncommitted results
  and a rerun embeds only what is missing; a dead worker or actor is restarted and its task
  retried by Ray Data (actors default to ``max_restarts=-1``); duplicate deliveries are dropped.
  Archive moments (Σx, Σxxᵀ) are kept per segment by the store and merge by addition.
* The writer needs only ``add(embeddings, items)``, ``items`` and ``len()`` — any store-like
  object (e.g. a Postgres/pgvector store) can be given instead of a directory.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd

from ..encoders.base import Encoder, ModelInfo
from ..encoders.builtin import default_registry
from ..encoders.registry import ModelRegistry
from ..errors import ModelMismatchError
from ..stores.directory import Store
from ..stores.postgres.store import is_pg_uri
from .images import (
    DEFAULT_MAX_PIXELS,
    BadFile,
    FileEntry,
    ImageDecodeError,
    ImageMeta,
    IndexReport,
    _changed_entries,
    _item_record,
    _write_report,
    load_image,
    read_label_csv,
    scan_folder,
)

log = logging.getLogger(__name__)


class ItemSink(Protocol):
    """What the writer needs from a store: append rows atomically, and the rows it holds."""

    @property
    def items(self) -> pd.DataFrame: ...

    def __len__(self) -> int: ...

    def add(self, embeddings: np.ndarray, items: Any) -> np.ndarray: ...


@dataclass(frozen=True)
class EncoderSpec:
    """How a worker builds the encoder: by registry name or arch + local checkpoint.

    ``registry_factory`` must be picklable (a module-level function by default); tests and
    applications pass their own to add models or backends.
    """

    model: str | None = None
    arch: str | None = None
    checkpoint: str | None = None
    precision: str = "auto"
    batch_size: int = 64
    registry_factory: Callable[[], ModelRegistry] = default_registry

    def build(self, device: str) -> Encoder:
        return self.registry_factory().load(
            self.model, arch=self.arch, checkpoint=self.checkpoint, device=device,
            precision=self.precision, batch_size=self.batch_size,
        )


@dataclass(frozen=True)
class _Probe:
    """What the driver learns from one CPU-built encoder: identity and input layout."""

    info: ModelInfo
    preprocess: Callable[[Any], Any]
    as_torch: bool
    shape: tuple[int, ...]
    dtype: str


def _probe(spec: EncoderSpec) -> _Probe:
    import torch
    from PIL import Image

    torch.set_num_threads(1)
    enc = spec.build("cpu")
    sample = enc.preprocess(Image.new("RGB", (64, 64)))
    as_torch = isinstance(sample, torch.Tensor)
    arr = sample.numpy() if as_torch else np.asarray(sample)
    return _Probe(enc.info, enc.preprocess, as_torch, tuple(arr.shape), str(arr.dtype))


def spec_for_store(
    info: ModelInfo,
    registry: ModelRegistry,
    *,
    model: str | None = None,
    arch: str | None = None,
    checkpoint: str | None = None,
) -> tuple[str | None, str | None, str | None]:
    """(model, arch, checkpoint) to rebuild a store's model, as
    :func:`rscir.api.load_encoder_for_store` resolves it, without loading weights here."""
    if model is None and arch is None:
        src = info.source or ""
        if checkpoint is None and src and os.path.isabs(src):
            checkpoint = src
        if info.name in registry.specs:
            model = info.name
        else:
            arch = info.arch
    return model, arch, checkpoint


# --------------------------------------------------------------------------- pipeline stages
def _decode_batch(
    batch: dict[str, np.ndarray],
    *,
    root: str,
    preprocess: Callable[[Any], Any],
    max_pixels: int,
    shape: tuple[int, ...],
    dtype: str,
) -> dict[str, np.ndarray]:
    """Decode + preprocess one block of files; failures become an ``error`` string per row."""
    n = len(batch["idx"])
    pixels = np.zeros((n, *shape), dtype=dtype)
    width = np.full(n, -1, np.int64)
    height = np.full(n, -1, np.int64)
    lon = np.full(n, np.nan)
    lat = np.full(n, np.nan)
    error = [""] * n
    for j, rel in enumerate(batch["path"]):  # one file at a time is inherent to decoding
        try:
            img, meta = load_image(Path(root) / str(rel), max_pixels)
            x = preprocess(img)
            pixels[j] = x.numpy() if hasattr(x, "numpy") else np.asarray(x)
            width[j], height[j], lon[j], lat[j] = meta.width, meta.height, meta.lon, meta.lat
        except ImageDecodeError as e:
            error[j] = str(e) or "undecodable"
        except Exception as e:  # noqa: BLE001 - a worker must never die on one file
            error[j] = f"{type(e).__name__}: {e}"
    return {
        "idx": np.asarray(batch["idx"], np.int64), "pixels": pixels, "width": width,
        "height": height, "lon": lon, "lat": lat, "error": np.array(error, dtype=object),
    }


class _EmbedActor:
    """One encoder per actor (one GPU each where there are GPUs); embeds decoded batches."""

    def __init__(self, spec: EncoderSpec, device: str, threads: int, info: ModelInfo,
                 as_torch: bool) -> None:
        import torch

        torch.set_num_threads(max(1, threads))
        self.encoder = spec.build(device)
        if not self.encoder.info.same_space(info):
            raise ModelMismatchError(
                f"worker built model {self.encoder.info.name!r} with weights "
                f"{self.encoder.info.fingerprint[:19]}…, but the store expects "
                f"{info.fingerprint[:19]}…: every node needs the same checkpoint file"
            )
        self.as_torch = as_torch
        self.dim = self.encoder.dim

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = np.asarray(batch["error"]).astype(str) == ""
        emb = np.zeros((len(ok), self.dim), np.float32)
        if ok.any():
            px = np.ascontiguousarray(batch["pixels"][ok])
            if self.as_torch:
                import torch

                items: list[Any] = list(torch.from_numpy(px))
            else:
                items = list(px)
            emb[ok] = self.encoder.encode_preprocessed(self.encoder.collate(items))
        out = {k: v for k, v in batch.items() if k != "pixels"}
        out["emb"] = emb
        return out


# --------------------------------------------------------------------------- Ray plumbing
@contextlib.contextmanager
def _ray_session(address: str | None, init_kwargs: dict[str, Any] | None) -> Iterator[None]:
    """Use the running Ray session, or connect/start one (and shut it down afterwards).

    ``address``: None = RAY_ADDRESS, else the latest local cluster, else a new local instance;
    "auto" = an existing cluster only; "local" = always a new local instance; "host:port" or
    "ray://host:10001" = that cluster.
    """
    try:
        import ray
    except ImportError as e:  # pragma: no cover - ray is a declared dependency
        raise RuntimeError("--ray needs Ray: pip install 'ray[data]'") from e
    if ray.is_initialized():
        yield
        return
    try:
        ray.init(address=address, logging_level=logging.WARNING, **(init_kwargs or {}))
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise RuntimeError(f"cannot start or reach a Ray cluster at {address or 'default'}: {e}") from e
    try:
        yield
    finally:
        ray.shutdown()


@contextlib.contextmanager
def _data_context(preserve_order: bool, progress: bool) -> Iterator[None]:
    """Ray Data options for this run only (the context is process-wide, so restore it)."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    old = (ctx.execution_options.preserve_order, ctx.enable_progress_bars)
    ctx.execution_options.preserve_order = preserve_order
    ctx.enable_progress_bars = progress
    try:
        yield
    finally:
        ctx.execution_options.preserve_order, ctx.enable_progress_bars = old


@dataclass(frozen=True)
class Placement:
    """How many encoder actors, where, and with what."""

    encoders: int
    device: str
    gpus_per_encoder: float
    cpus_per_encoder: float


def plan_placement(
    resources: dict[str, float],
    *,
    device: str = "auto",
    num_encoders: int | None = None,
    cpus_per_encoder: float = 1.0,
) -> Placement:
    """One encoder per GPU when the cluster has GPUs (unless ``device='cpu'``); otherwise CPU
    encoders on half the cores, leaving the other half to decoding."""
    gpus = int(resources.get("GPU", 0))
    cpus = int(resources.get("CPU", 1))
    if num_encoders is not None and num_encoders < 1:
        raise ValueError("the number of encoders must be >= 1")
    if device.startswith("cuda") and gpus == 0:
        raise RuntimeError(f"--device {device} was asked for but the Ray cluster has no GPUs")
    if device != "cpu" and gpus > 0:
        return Placement(num_encoders or gpus, "cuda", 1.0, cpus_per_encoder)
    n = num_encoders or max(1, int(cpus // max(2 * cpus_per_encoder, 1)))
    return Placement(n, "cpu", 0.0, cpus_per_encoder)


BLOCK_BYTES = 32 * 1024**2  # decoded pixels per Ray block: small next to any object store
DECODE_WORKER_BYTES = 640 * 1024**2  # a Ray worker with torch + torchvision imported (measured)


def _block_rows(n: int, cpus: int, item_bytes: int) -> int:
    """Paths per input block: a few blocks per core so every CPU decodes from the start, and
    no more decoded pixels per block than :data:`BLOCK_BYTES` (the blocks travel through the
    object store between decoders and encoders)."""
    by_bytes = max(1, BLOCK_BYTES // max(item_bytes, 1))
    return int(max(1, min(by_bytes, math.ceil(n / max(4 * cpus, 1)))))


def _dataset_of_blocks(blocks: list[Any]) -> Any:
    """A Ray dataset of these input blocks, as they are. ``from_blocks`` reads their metadata
    in the driver; ``from_arrow`` (older Ray) runs one small remote task per block for it."""
    import ray.data

    make = getattr(ray.data, "from_blocks", None)
    return make(blocks) if make is not None else ray.data.from_arrow(blocks)


# --------------------------------------------------------------------------- driver
def open_sink(
    store: str | os.PathLike[str] | ItemSink,
    info: ModelInfo,
    root: Path,
    dtype: str,
) -> tuple[ItemSink, bool]:
    """(store-like, opened here?) for a store directory or an already open store-like."""
    if isinstance(store, str | os.PathLike):
        if is_pg_uri(store):
            from ..stores.postgres.store import PgStore

            return PgStore.open_or_create(str(store), info, root, dtype=dtype), True
        return Store.open_or_create(store, info, root, dtype=dtype), True
    check = getattr(store, "check_model", None)
    if callable(check):
        check(info)
    return store, False


def _existing_model(store: str | os.PathLike[str] | ItemSink) -> ModelInfo | None:
    """The model of an existing store (directory, postgresql:// URI or open store), else None."""
    if isinstance(store, str) and is_pg_uri(store):
        from ..stores.postgres.store import PgStore

        if not PgStore.exists(store):
            return None
        with PgStore.open(store) as st:
            return st.manifest.model
    if isinstance(store, str | os.PathLike):
        if (Path(store) / "manifest.json").is_file():
            return Store.open(store).manifest.model
        return None
    manifest = getattr(store, "manifest", None)
    return getattr(manifest, "model", None)


def index_folder_ray(
    folder: str | os.PathLike[str],
    store: str | os.PathLike[str] | ItemSink,
    *,
    model: str | None = None,
    arch: str | None = None,
    checkpoint: str | None = None,
    device: str = "auto",
    address: str | None = None,
    labels: str = "folder",
    labels_csv: str | os.PathLike[str] | None = None,
    dtype: str = "float16",
    batch_size: int = 64,
    segment_size: int = 2048,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    num_encoders: int | None = None,
    cpus_per_encoder: float = 1.0,
    precision: str = "auto",
    preserve_order: bool = False,
    progress: bool = True,
    compact: bool = True,
    registry_factory: Callable[[], ModelRegistry] = default_registry,
    ray_init_kwargs: dict[str, Any] | None = None,
) -> IndexReport:
    """Index (or resume indexing) ``folder`` into ``store`` with a Ray Data pipeline.

    ``store`` is a store directory or any store-like object (:class:`ItemSink`). The archive
    folder must be readable at the same path on every Ray node (a shared filesystem), and
    rscir with its model backends must be installed on every node. With an existing store and
    no model given, the store's own model is used. ``preserve_order=True`` gives new items ids
    in file order, exactly as the local path does (at some cost in throughput).
    """
    from tqdm.auto import tqdm

    if batch_size < 1 or segment_size < 1:
        raise ValueError("batch_size and segment_size must be >= 1")
    t0 = time.perf_counter()
    root = Path(folder).resolve()
    entries, others = scan_folder(root)
    label_map = read_label_csv(labels_csv) if labels_csv is not None else None
    if labels == "csv" and label_map is None:
        raise ValueError("labels='csv' needs labels_csv")
    registry = registry_factory()
    existing = _existing_model(store)
    if existing is not None:
        model, arch, checkpoint = spec_for_store(existing, registry, model=model, arch=arch,
                                                 checkpoint=checkpoint)
    else:
        registry.resolve(model, arch=arch, checkpoint=checkpoint)  # fail fast on a bad name
    spec = EncoderSpec(model, arch, checkpoint, precision, batch_size, registry_factory)

    with _ray_session(address, ray_init_kwargs):
        import ray

        probe: _Probe = ray.get(ray.remote(num_cpus=1)(_probe).remote(spec))
        sink, owned = open_sink(store, probe.info, root, dtype)
        report = IndexReport(root=str(root), store=str(getattr(sink, "path", store)),
                             scanned=len(entries))
        report.ignored = [
            BadFile(o.path, f"not an image file type ({Path(o.path).suffix or 'no extension'})")
            for o in others
        ]
        try:
            todo = _changed_entries(sink, entries)  # type: ignore[arg-type]
            report.already_indexed = len(entries) - len(todo)
            if todo:
                _run_pipeline(sink, todo, root, spec, probe, report, labels=labels,
                              label_map=label_map, batch_size=batch_size,
                              segment_size=segment_size, max_pixels=max_pixels,
                              device=device, num_encoders=num_encoders,
                              cpus_per_encoder=cpus_per_encoder,
                              preserve_order=preserve_order, progress=progress, tqdm=tqdm)
            if compact and callable(getattr(sink, "compact", None)):
                sink.compact()  # type: ignore[attr-defined]
            report.total_items = len(sink)
        finally:
            report.seconds = time.perf_counter() - t0
            if getattr(sink, "path", None) is not None:  # Store, PgStore: a local reports/
                _write_report(sink, report)  # type: ignore[arg-type]
            if owned and callable(getattr(sink, "close", None)):
                sink.close()  # type: ignore[attr-defined]
    return report


def _run_pipeline(
    sink: ItemSink,
    todo: list[FileEntry],
    root: Path,
    spec: EncoderSpec,
    probe: _Probe,
    report: IndexReport,
    *,
    labels: str,
    label_map: dict[str, tuple[str | None, list[str]]] | None,
    batch_size: int,
    segment_size: int,
    max_pixels: int,
    device: str,
    num_encoders: int | None,
    cpus_per_encoder: float,
    preserve_order: bool,
    progress: bool,
    tqdm: Any,
) -> None:
    import ray

    resources = ray.cluster_resources()
    place = plan_placement(resources, device=device, num_encoders=num_encoders,
                           cpus_per_encoder=cpus_per_encoder)
    log.info("ray ingest: %d files, %d encoder(s) on %s", len(todo), place.encoders, place.device)
    n = len(todo)
    item_bytes = int(np.prod(probe.shape)) * np.dtype(probe.dtype).itemsize
    rows = _block_rows(n, int(resources.get("CPU", 1)), item_bytes)
    import pyarrow as pa

    table = pa.table({"idx": np.arange(n, dtype=np.int64), "path": [e.path for e in todo]})
    blocks = [table.slice(s, rows) for s in range(0, n, rows)]
    # A decode worker holds torch (for the model's preprocessing), its block's pixels and one
    # decoded full-size RGB image. Saying so is a scheduling hint, and it also keeps decoding a
    # separate operator: Ray Data fuses a task stage into the next actor stage when their
    # resources are equal, which on CPU-only clusters would serialize decoding in front of
    # the encoder.
    decode_memory = DECODE_WORKER_BYTES + 2 * rows * item_bytes + 3 * max_pixels

    seen = np.zeros(n, dtype=bool)  # a retried task may deliver a row twice: keep the first
    buf_emb: list[np.ndarray] = []
    buf_items: list[dict[str, Any]] = []

    def flush() -> None:
        if buf_items:
            sink.add(np.concatenate(buf_emb), buf_items)
            report.embedded += len(buf_items)
            buf_emb.clear()
            buf_items.clear()

    bar = tqdm(total=n, desc="indexing (ray)", unit="img", disable=not progress)
    with _data_context(preserve_order, progress=False):
        ds = (
            _dataset_of_blocks(blocks)
            .map_batches(
                _decode_batch, batch_size=None, num_cpus=1, memory=decode_memory,
                batch_format="numpy",
                fn_kwargs={"root": str(root), "preprocess": probe.preprocess,
                           "max_pixels": max_pixels, "shape": probe.shape, "dtype": probe.dtype},
            )
            .map_batches(
                _EmbedActor, batch_size=batch_size, batch_format="numpy", zero_copy_batch=False,
                compute=ray.data.ActorPoolStrategy(size=place.encoders),
                num_gpus=place.gpus_per_encoder, num_cpus=place.cpus_per_encoder,
                fn_constructor_kwargs={
                    "spec": spec, "device": place.device,
                    "threads": max(1, int(place.cpus_per_encoder)), "info": probe.info,
                    "as_torch": probe.as_torch,
                },
            )
        )
        try:
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                idx = np.asarray(batch["idx"], np.int64)
                fresh = ~seen[idx]
                fresh &= ~pd.Series(idx).duplicated().to_numpy()
                seen[idx[fresh]] = True
                err = np.asarray(batch["error"]).astype(str)
                ok = err == ""
                for j in np.flatnonzero(fresh & ~ok):
                    report.bad.append(BadFile(todo[int(idx[j])].path, str(err[j])))
                good = fresh & ok
                w, h = batch["width"][good], batch["height"][good]
                lon, lat = batch["lon"][good], batch["lat"][good]
                # one record per new item, as the local path builds them (not per pixel)
                buf_items.extend(
                    _item_record(todo[int(i)], ImageMeta(int(a), int(b), float(c), float(d)),
                                 labels, label_map)
                    for i, a, b, c, d in zip(idx[good], w, h, lon, lat, strict=True)
                )
                if good.any():
                    buf_emb.append(np.asarray(batch["emb"][good], np.float32))
                bar.update(int(fresh.sum()))
                if len(buf_items) >= segment_size:
                    flush()
        except BaseException:
            # results already embedded are committed before the error propagates
            with contextlib.suppress(Exception):
                flush()
            raise
        finally:
            bar.close()
            report.bad.sort(key=lambda b: b.path)  # arrival order is arbitrary; report it stably
        flush()


# --------------------------------------------------------------------------- CLI adapter
def index_from_args(a: argparse.Namespace) -> IndexReport:
    """`rscir index ... --ray [ADDRESS]` (the option is declared in rscir.commands.core)."""
    return index_folder_ray(
        a.folder, a.store, model=a.model, arch=a.arch, checkpoint=a.checkpoint, device=a.device,
        address=a.ray or None,
        labels="csv" if a.labels_csv and a.labels == "none" else a.labels,
        labels_csv=a.labels_csv, dtype=a.dtype, batch_size=a.batch_size,
        segment_size=a.segment_size, max_pixels=a.max_pixels, progress=not a.no_progress,
    )
