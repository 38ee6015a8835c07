"""`rscir index --ray`: the local ingestion path spread over the CPUs and GPUs of a Ray cluster.

    CPU cluster:  plan units (driver) ─► blocks of units ─► encoder actors, one per core of
                  every node, each decoding and embedding its block ─► driver commits segments
    GPU cluster:  plan units (driver) ─► decode + preprocess (CPU tasks, Ray Data)
                  ─► embed (actor pool, 1 GPU each) ─► driver commits segments

Why this shape:

* A :class:`~rscir.ingest.pipeline.Driver` of the one ingestion pipeline: the file walk, resume
  rule, item records, commits and report are the runner's, and decoding uses the same
  :func:`~rscir.ingest.images.decode_unit` and the encoder's picklable ``preprocess``, so a
  Ray-built store equals a locally built one.
* Without GPUs, decoding and embedding share each core, as in the local path: an encoder actor
  per core (:class:`UnitEncoder`) takes blocks of ``batch_size`` unit descriptions (paths and
  chip windows), decodes them and returns embeddings, so no pixels cross the object store, and
  the actors start once per session, all at once (the first one's model identity is the
  store's; there is no separate probe). With GPUs, one encoder per GPU needs many decoding
  cores, so decoding runs as Ray Data tasks on every CPU and streams pixels to the GPU actors.
* Encoders are built *inside* each actor from a registry name/arch/checkpoint
  (:class:`EncoderSpec`), never shipped as pickled models; every actor must build the same
  embedding space (weights fingerprint), and the store checks it is its own.
* Only the runner in the driver process writes, through the store's own atomic ``add`` (one
  segment per commit), so the store's guarantees hold unchanged: a killed driver loses at most
  the uncommitted results and a rerun embeds only what is missing; a dead actor is restarted
  and its block retried by Ray (``max_restarts=-1``, ``max_task_retries=-1``; Ray Data does the
  same for the GPU pipeline); duplicate deliveries are dropped by the runner. Any store
  backend works (directory or Postgres).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..encoders.base import BandLayout, Encoder, ModelInfo
from ..encoders.builtin import default_registry
from ..encoders.registry import ModelRegistry
from ..errors import InvalidArgumentError, MissingDependencyError, ModelMismatchError, StoreError
from ..stores.base import EmbeddingStore
from ..stores.uri import existing_model
from .images import ImageDecodeError, decode_unit
from .pipeline import Driver, EmbeddedBatch, IndexReport, IngestOptions, run_index
from .rasters import RasterCache
from .sensors import RasterRead
from .units import ImageMeta, UnitTask, WorkPlan

log = logging.getLogger(__name__)


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
    layout: BandLayout | None = None  # all-band encoders: the archive's bands

    def build(self, device: str) -> Encoder:
        enc = self.registry_factory().load(
            self.model, arch=self.arch, checkpoint=self.checkpoint, device=device,
            precision=self.precision, batch_size=self.batch_size,
        )
        return enc.for_bands(self.layout) if self.layout is not None else enc

    def band_request(self) -> str:
        """"all" for a model whose spec says it reads every band (no model is built)."""
        spec = self.registry_factory().resolve(self.model, arch=self.arch,
                                               checkpoint=self.checkpoint)
        return str(spec.options.get("bands", "rgb"))


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

    torch.set_num_threads(1)
    enc = spec.build("cpu")
    sample = enc.preprocess(enc.probe_input())
    as_torch = isinstance(sample, torch.Tensor)
    arr = sample.numpy() if as_torch else np.asarray(sample)
    return _Probe(enc.info, enc.preprocess, as_torch, tuple(arr.shape), str(arr.dtype))


# --------------------------------------------------------------------------- pipeline stages
def _decode_rows(
    batch: dict[str, np.ndarray],
    *,
    root: str,
    preprocess: Callable[[Any], Any],
    max_pixels: int,
    read: RasterRead | None = None,
    cache: RasterCache | None = None,
) -> tuple[dict[str, np.ndarray], list[Any]]:
    """Decode + preprocess one block of units: (what decoding learnt per row, the preprocessed
    input per row or None). Failures become an ``error`` string per row, chips skipped as
    empty an ``empty`` flag. ``cache`` keeps scenes open across blocks (a long-lived actor);
    without one, a cache lives for this block."""
    n = len(batch["idx"])
    items: list[Any] = [None] * n
    width = np.full(n, -1, np.int64)
    height = np.full(n, -1, np.int64)
    lon = np.full(n, np.nan)
    lat = np.full(n, np.nan)
    crs = [""] * n
    foot: list[bytes] = [b""] * n
    foot_native: list[bytes] = [b""] * n
    when = [""] * n
    empty = np.zeros(n, bool)
    error = [""] * n
    own = cache is None
    rc = RasterCache(max_pixels=max_pixels) if cache is None else cache
    rd = read or RasterRead()
    win = np.stack([np.asarray(batch[k], np.int64) for k in ("c", "r", "w", "h")], axis=1)
    try:
        for j, files in enumerate(batch["files"]):  # one unit at a time is inherent to decoding
            try:
                w = win[j]
                task = UnitTask(tuple(str(files).split("\n")),
                                None if w[2] < 0 else (int(w[0]), int(w[1]), int(w[2]),
                                                       int(w[3])), bool(batch["stacked"][j]))
                img, meta, _ = decode_unit(Path(root), task, rd, rc, max_pixels)
                width[j], height[j], lon[j], lat[j] = meta.width, meta.height, meta.lon, meta.lat
                crs[j], when[j] = meta.crs or "", meta.datetime or ""
                foot[j], foot_native[j] = meta.footprint or b"", meta.footprint_native or b""
                if img is None:
                    empty[j] = True
                    continue
                items[j] = preprocess(img)
            except ImageDecodeError as e:
                error[j] = str(e) or "undecodable"
            except Exception as e:  # noqa: BLE001 - a worker must never die on one file
                error[j] = f"{type(e).__name__}: {e}"
    finally:
        if own:
            rc.close()
    cols = {
        "idx": np.asarray(batch["idx"], np.int64), "width": width,
        "height": height, "lon": lon, "lat": lat, "crs": np.array(crs, dtype=object),
        "footprint": np.array(foot, dtype=object),
        "footprint_native": np.array(foot_native, dtype=object),
        "datetime": np.array(when, dtype=object), "empty": empty,
        "error": np.array(error, dtype=object),
    }
    return cols, items


def _decode_batch(
    batch: dict[str, np.ndarray],
    *,
    root: str,
    preprocess: Callable[[Any], Any],
    max_pixels: int,
    shape: tuple[int, ...],
    dtype: str,
    read: RasterRead | None = None,
) -> dict[str, np.ndarray]:
    """The decode stage of the GPU pipeline: :func:`_decode_rows` with the inputs packed into
    one ``pixels`` array (they travel through the object store to the encoders)."""
    cols, items = _decode_rows(batch, root=root, preprocess=preprocess, max_pixels=max_pixels,
                               read=read)
    pixels = np.zeros((len(items), *shape), dtype=dtype)
    for j, x in enumerate(items):
        if x is not None:
            pixels[j] = x.numpy() if hasattr(x, "numpy") else np.asarray(x)
    cols["pixels"] = pixels
    return cols


class UnitEncoder:
    """A CPU encoder actor: decodes *and* embeds blocks of units, one actor per
    ``cpus_per_encoder`` cores of every node (the local path's decode workers and model in one
    process per core, with no pixels through the object store)."""

    def __init__(self, spec: EncoderSpec, device: str, threads: int) -> None:
        import torch

        torch.set_num_threads(max(1, threads))
        self.encoder = spec.build(device)
        self.cache: RasterCache | None = None

    def info(self) -> ModelInfo:
        return self.encoder.info

    def embed(self, rows: dict[str, np.ndarray], root: str, read: RasterRead,
              max_pixels: int) -> dict[str, np.ndarray]:
        if self.cache is None or self.cache.max_pixels != max_pixels:
            self.cache = RasterCache(max_pixels=max_pixels)  # scenes stay open across blocks
        enc = self.encoder
        cols, items = _decode_rows(rows, root=root, preprocess=enc.preprocess,
                                   max_pixels=max_pixels, read=read, cache=self.cache)
        ok = [j for j, x in enumerate(items) if x is not None]
        emb = np.zeros((len(items), enc.dim), np.float32)
        if ok:
            emb[ok] = enc.encode_preprocessed(enc.collate([items[j] for j in ok]))
        cols["emb"] = emb
        return cols


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
        ok = (np.asarray(batch["error"]).astype(str) == "") & ~np.asarray(batch["empty"], bool)
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
    "ray://host:10001" = that cluster. Ray's known-harmless noise is dropped meanwhile
    (:func:`_quiet_ray`), so a successful run prints no line that looks like an error.
    """
    try:
        import ray
    except ImportError as e:
        raise MissingDependencyError(
            "--ray needs the Python package 'ray', which is not installed: "
            "pip install 'rscir[ray]'") from e
    if ray.is_initialized():
        with _quiet_ray():
            yield
        return
    try:
        ray.init(address=address, logging_level=logging.WARNING, **(init_kwargs or {}))
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise StoreError(f"cannot start or reach a Ray cluster at {address or 'default'}: {e}; "
                         "check the address (docs/ray.md) or drop --ray") from e
    try:
        with _quiet_ray():
            yield
    finally:
        ray.shutdown()


# Lines Ray prints on every successful Ray Data run with an actor pool, at error level although
# nothing is wrong: the driver's core worker warns that the pool's actors (max_restarts=-1)
# get their constructor arguments from the object store (ray-project/ray#57733, open).
RAY_BENIGN_STDERR = (b"has constructor arguments in the object store and max_restarts > 0",)


@contextlib.contextmanager
def _quiet_ray() -> Iterator[None]:
    """Ray Data's console chatter to the log file only (its start/finish INFO lines and the
    "progress bars disabled" warning; kept with ``-v``), and the benign core-worker lines of
    :data:`RAY_BENIGN_STDERR` dropped from this process's stderr; everything else passes."""
    import ray.data  # noqa: F401 - configures the "ray.data" logger whose console is quieted

    data_log = logging.getLogger("ray.data")
    consoles = [h for h in data_log.handlers
                if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]
    verbose = logging.getLogger().isEnabledFor(logging.DEBUG)
    old = [h.level for h in consoles]
    if not verbose:
        for h in consoles:
            h.setLevel(max(h.level, logging.ERROR))
    try:
        with _filtered_stderr(RAY_BENIGN_STDERR if not verbose else ()):
            yield
    finally:
        for h, level in zip(consoles, old, strict=True):
            h.setLevel(level)


@contextlib.contextmanager
def _filtered_stderr(drop: tuple[bytes, ...]) -> Iterator[None]:
    """Pass file descriptor 2 through a pipe that drops the lines containing one of ``drop``
    (C++ code writes there directly, so Python's logging cannot filter it). Partial lines are
    forwarded at once (progress bars); without ``drop``, or where pipes fail, nothing changes."""
    import sys
    import threading

    if not drop:
        yield
        return
    try:
        sys.stderr.flush()
        saved = os.dup(2)
        r, w = os.pipe()
        os.dup2(w, 2)
        os.close(w)
    except (OSError, ValueError):  # no real fd 2 (embedded interpreters, some test runners)
        yield
        return

    def pump() -> None:
        import re

        pending = b""
        with os.fdopen(r, "rb", buffering=0) as src:
            while chunk := src.read(65536):
                # pieces end with "\n" or "\r" (progress bars redraw with "\r")
                pieces = re.split(rb"(?<=[\r\n])", pending + chunk)
                pending = pieces.pop()
                out = b"".join(x for x in pieces if not any(d in x for d in drop))
                if pending and not pending.startswith(b"["):  # not a C++ log line in progress
                    out, pending = out + pending, b""
                if out:
                    os.write(saved, out)
        if pending and not any(d in pending for d in drop):
            os.write(saved, pending)

    t = threading.Thread(target=pump, name="rscir-ray-stderr", daemon=True)
    t.start()
    try:
        yield
    finally:
        with contextlib.suppress(ValueError, OSError):
            sys.stderr.flush()
        os.dup2(saved, 2)  # closes the pipe's last write end: the pump reads EOF and ends
        t.join(timeout=5)
        os.close(saved)


@contextlib.contextmanager
def _data_context(preserve_order: bool, progress: bool) -> Iterator[None]:
    """Ray Data options for this run only (the context is process-wide, so restore it)."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    old = (ctx.execution_options.preserve_order, ctx.enable_progress_bars)
    ctx.execution_options.preserve_order = preserve_order
    ctx.enable_progress_bars = progress
    quiet = hasattr(ctx, "print_on_execution_start")  # "Starting execution of Dataset ..."
    old_print = getattr(ctx, "print_on_execution_start", None)
    if quiet and not logging.getLogger().isEnabledFor(logging.DEBUG):
        ctx.print_on_execution_start = False
    try:
        yield
    finally:
        ctx.execution_options.preserve_order, ctx.enable_progress_bars = old
        if quiet:
            ctx.print_on_execution_start = old_print


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
    """One encoder per GPU when the cluster has GPUs (unless ``device='cpu'``), fed by decode
    tasks on the CPUs; otherwise one CPU encoder per ``cpus_per_encoder`` cores, each decoding
    its own units (:class:`UnitEncoder`)."""
    gpus = int(resources.get("GPU", 0))
    cpus = int(resources.get("CPU", 1))
    if num_encoders is not None and num_encoders < 1:
        raise InvalidArgumentError("the number of encoders must be >= 1")
    if device.startswith("cuda") and gpus == 0:
        raise InvalidArgumentError(
            f"--device {device} was asked for but the Ray cluster has no GPUs; use --device cpu")
    if device != "cpu" and gpus > 0:
        return Placement(num_encoders or gpus, "cuda", 1.0, cpus_per_encoder)
    n = num_encoders or max(1, int(cpus // max(cpus_per_encoder, 1e-3)))
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




# --------------------------------------------------------------------------- the driver
IN_FLIGHT = 2  # blocks queued per CPU encoder: the next one is there when a block is done


def _embedded(batch: dict[str, np.ndarray]) -> EmbeddedBatch:
    """What an encoder returned, as the runner takes it."""
    err = np.asarray(batch["error"]).astype(str)
    meta = [ImageMeta(int(a), int(b), float(c), float(d), str(k) or None,
                      bytes(f) or None, bytes(g) or None, str(t) or None)
            for a, b, c, d, k, f, g, t in zip(
                batch["width"], batch["height"], batch["lon"], batch["lat"],
                batch["crs"], batch["footprint"], batch["footprint_native"],
                batch["datetime"], strict=True)]
    return EmbeddedBatch(
        idx=np.asarray(batch["idx"], np.int64),
        embeddings=np.asarray(batch["emb"], np.float32),
        meta=[m if e == "" else None for m, e in zip(meta, err, strict=True)],
        errors=[None if e == "" else str(e) for e in err],
        empty=np.asarray(batch["empty"], bool),
    )


def _unit_columns(plan: WorkPlan) -> dict[str, np.ndarray]:
    """The work plan as columns (one row per unit): what a decoder needs, and nothing else."""
    files = np.array(["\n".join(s.band_files) for s in plan.sources], dtype=object)
    stacked = np.array([bool(s.files) for s in plan.sources], bool)
    return {"idx": np.arange(len(plan), dtype=np.int64), "files": files[plan.src],
            "c": plan.win[:, 0], "r": plan.win[:, 1], "w": plan.win[:, 2],
            "h": plan.win[:, 3], "stacked": stacked[plan.src]}


class RayDriver(Driver):
    """Encoder actors on a Ray cluster (see module docstring): CPU encoders that decode their
    own blocks of units, or GPU encoders fed by decode tasks (Ray Data)."""

    def __init__(
        self,
        spec: EncoderSpec,
        *,
        address: str | None = None,
        device: str = "auto",
        num_encoders: int | None = None,
        cpus_per_encoder: float = 1.0,
        preserve_order: bool = False,
        ray_init_kwargs: dict[str, Any] | None = None,
    ) -> None:
        self.spec = spec
        self.address = address
        self.device = device
        self.num_encoders = num_encoders
        self.cpus_per_encoder = cpus_per_encoder
        self.preserve_order = preserve_order
        self.ray_init_kwargs = ray_init_kwargs
        self._probe: _Probe | None = None
        self._place: Placement | None = None
        self._actors: list[Any] = []

    @contextlib.contextmanager
    def session(self) -> Iterator[ModelInfo]:
        """Start the cluster session and the encoders. CPU encoders are started here, all at
        once, and the first one's model identity is the store's: the start-up (worker
        processes, imports, model builds) is paid once per session, in parallel, with no
        separate probe."""
        with _ray_session(self.address, self.ray_init_kwargs):
            import ray

            place = plan_placement(ray.cluster_resources(), device=self.device,
                                   num_encoders=self.num_encoders,
                                   cpus_per_encoder=self.cpus_per_encoder)
            self._place = place
            if place.device != "cpu":
                self._probe = ray.get(ray.remote(num_cpus=1)(_probe).remote(self.spec))
                yield self._probe.info
                return
            actor = ray.remote(UnitEncoder).options(
                num_cpus=place.cpus_per_encoder, max_restarts=-1, max_task_retries=-1)
            threads = max(1, int(place.cpus_per_encoder))
            self._actors = [actor.remote(self.spec, "cpu", threads)
                            for _ in range(place.encoders)]
            try:
                infos = ray.get([a.info.remote() for a in self._actors])
                for other in infos[1:]:
                    if not other.same_space(infos[0]):
                        raise ModelMismatchError(
                            f"encoders on different nodes built model {infos[0].name!r} with "
                            f"different weights ({infos[0].fingerprint[:19]}… and "
                            f"{other.fingerprint[:19]}…): every node needs the same "
                            "checkpoint file")
                log.info("ray ingest: %d CPU encoder(s), %s CPU(s) each", place.encoders,
                         place.cpus_per_encoder)
                yield infos[0]
            finally:
                for a in self._actors:
                    ray.kill(a)
                self._actors = []

    def band_request(self) -> str:
        return self.spec.band_request()

    def bind_bands(self, layout: BandLayout) -> None:
        self.spec = replace(self.spec, layout=layout)

    def embed(self, root: Path, plan: WorkPlan, read: RasterRead, opts: IngestOptions,
              ) -> Iterator[EmbeddedBatch]:
        if self._place is None:
            raise InvalidArgumentError(
                "RayDriver.embed runs inside session(); call it within `with driver.session()`")
        if self._place.device == "cpu":
            yield from self._embed_on_cpus(root, plan, read, opts)
        else:
            yield from self._embed_with_gpus(root, plan, read, opts)

    def _embed_on_cpus(self, root: Path, plan: WorkPlan, read: RasterRead,
                       opts: IngestOptions) -> Iterator[EmbeddedBatch]:
        """Blocks of ``batch_size`` units to the CPU encoders, :data:`IN_FLIGHT` queued on
        each; a block goes to the encoder that finished one. Only unit descriptions travel
        (paths and windows), and embeddings and metadata come back."""
        import ray

        cols = _unit_columns(plan)
        n, rows = len(plan), opts.batch_size
        starts = collections.deque(range(0, n, rows))
        pending: dict[Any, tuple[int, int]] = {}  # object ref -> (first unit, encoder)

        def submit(k: int) -> None:
            s = starts.popleft()
            block = {key: v[s : s + rows] for key, v in cols.items()}
            ref = self._actors[k].embed.remote(block, str(root), read, opts.max_pixels)
            pending[ref] = (s, k)

        for _ in range(IN_FLIGHT):
            for k in range(len(self._actors)):
                if starts:
                    submit(k)
        done: dict[int, EmbeddedBatch] = {}
        nxt = 0
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            s, k = pending.pop(ready[0])
            if starts:
                submit(k)
            batch = _embedded(ray.get(ready[0]))
            if not self.preserve_order:
                yield batch
                continue
            done[s] = batch
            while nxt in done:
                yield done.pop(nxt)
                nxt += rows

    def _embed_with_gpus(self, root: Path, plan: WorkPlan, read: RasterRead,
                         opts: IngestOptions) -> Iterator[EmbeddedBatch]:
        """Decode tasks on the CPUs, an encoder actor per GPU (a Ray Data pipeline, which
        streams decoded pixels to the GPUs with back-pressure)."""
        import pyarrow as pa
        import ray

        probe, place = self._probe, self._place
        assert probe is not None and place is not None
        resources = ray.cluster_resources()
        log.info("ray ingest: %d units, %d encoder(s) on %s", len(plan), place.encoders,
                 place.device)
        n = len(plan)
        item_bytes = int(np.prod(probe.shape)) * np.dtype(probe.dtype).itemsize
        rows = _block_rows(n, int(resources.get("CPU", 1)), item_bytes)
        table = pa.table(_unit_columns(plan))
        blocks = [table.slice(s, rows) for s in range(0, n, rows)]
        # A decode worker holds torch (for the model's preprocessing), its block's pixels and
        # one decoded full-size RGB image. Saying so is a scheduling hint, and it also keeps
        # decoding a separate operator: Ray Data fuses a task stage into the next actor stage
        # when their resources are equal.
        decode_memory = DECODE_WORKER_BYTES + 2 * rows * item_bytes + 3 * opts.max_pixels
        with _data_context(self.preserve_order, progress=False):
            ds = (
                _dataset_of_blocks(blocks)
                .map_batches(
                    _decode_batch, batch_size=None, num_cpus=1, memory=decode_memory,
                    batch_format="numpy",
                    fn_kwargs={"root": str(root), "preprocess": probe.preprocess,
                               "max_pixels": opts.max_pixels, "shape": probe.shape,
                               "dtype": probe.dtype, "read": read},
                )
                .map_batches(
                    _EmbedActor, batch_size=opts.batch_size, batch_format="numpy",
                    zero_copy_batch=False,
                    compute=ray.data.ActorPoolStrategy(size=place.encoders),
                    num_gpus=place.gpus_per_encoder, num_cpus=place.cpus_per_encoder,
                    fn_constructor_kwargs={
                        "spec": self.spec, "device": place.device,
                        "threads": max(1, int(place.cpus_per_encoder)), "info": probe.info,
                        "as_torch": probe.as_torch,
                    },
                )
            )
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                yield _embedded(batch)


def index_folder_ray(
    folder: str | os.PathLike[str],
    store: str | os.PathLike[str] | EmbeddingStore,
    *,
    model: str | None = None,
    arch: str | None = None,
    checkpoint: str | None = None,
    device: str = "auto",
    address: str | None = None,
    num_encoders: int | None = None,
    cpus_per_encoder: float = 1.0,
    precision: str = "auto",
    preserve_order: bool = False,
    registry_factory: Callable[[], ModelRegistry] = default_registry,
    ray_init_kwargs: dict[str, Any] | None = None,
    **options: Any,
) -> IndexReport:
    """Index (or resume indexing) ``folder`` into ``store`` with a Ray Data pipeline.

    The archive folder must be readable at the same path on every Ray node (a shared
    filesystem), and rscir with its model backends must be installed on every node. With an
    existing store and no model given, the store's own model is used. ``preserve_order=True``
    gives new items ids in file order, exactly as the local path does (at some cost in
    throughput). ``options`` are :class:`~rscir.ingest.pipeline.IngestOptions` fields."""
    opts = IngestOptions(**options).check()
    registry = registry_factory()
    info = existing_model(store)
    if info is not None:
        model, arch, checkpoint = registry.args_for_store(info, model=model, arch=arch,
                                                          checkpoint=checkpoint)
    else:
        registry.resolve(model, arch=arch, checkpoint=checkpoint)  # fail fast on a bad name
    spec = EncoderSpec(model, arch, checkpoint, precision, opts.batch_size, registry_factory)
    driver = RayDriver(spec, address=address, device=device, num_encoders=num_encoders,
                       cpus_per_encoder=cpus_per_encoder, preserve_order=preserve_order,
                       ray_init_kwargs=ray_init_kwargs)
    return run_index(folder, store, driver, opts)
