"""The abstract embedding store: what every backend shares, written once.

Modelled on docarray's ``BaseDocIndex`` and FAISS's small ``Index`` core: the public methods
(validation and casting in :meth:`~EmbeddingStore.add`, model checks, archive-path safety,
artifact folders, :meth:`~EmbeddingStore.open_or_create`, paging and label counts) live here;
a backend (:mod:`.directory`, :mod:`.postgres`) fills the private ``_add`` and the few reading
primitives. Search never reaches behind this interface: ids, not row numbers, cross it (as FAISS
labels do), and each backend names the search strategies it offers
(:attr:`EmbeddingStore.backend` keys them in :mod:`rscir.search.strategy`).
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import numpy as np
import pandas as pd

from ..encoders.base import ModelInfo
from ..errors import InvalidArgumentError, ModelMismatchError, StoreError, StoreExistsError
from ..moments import Moments
from .filters import FilterIndex, ItemFilter
from .integrity import RepairReport, VerifyReport
from .schema import DTYPES, Manifest, check_dtype, normalize_items

S = TypeVar("S", bound="EmbeddingStore")


class EmbeddingStore(ABC):
    """Embeddings of an archive's items, their metadata and the archive moments.

    Items have stable int64 ids; ``items`` and ``embeddings`` list the live items in one order
    (row ``i`` of one is row ``i`` of the other). A writable store has one writer at a time."""

    backend: ClassVar[str]
    manifest: Manifest
    writable: bool

    # ----------------------------------------------------------------- opening
    @classmethod
    @abstractmethod
    def exists(cls, location: str | os.PathLike[str]) -> bool:
        """True when ``location`` holds a store of this backend."""

    @classmethod
    @abstractmethod
    def open(cls: type[S], location: str | os.PathLike[str], *, writable: bool = False) -> S:
        """Open an existing store (read-only unless ``writable``)."""

    @classmethod
    @abstractmethod
    def create(cls: type[S], location: str | os.PathLike[str], model: ModelInfo,
               root: str | os.PathLike[str], *, dtype: str = "float16") -> S:
        """Make a new, empty, writable store."""

    @classmethod
    def open_or_create(cls: type[S], location: str | os.PathLike[str], model: ModelInfo,
                       root: str | os.PathLike[str], *, dtype: str = "float16") -> S:
        """Open for appending (checking model, archive root and dtype) or create if absent."""
        check_dtype(dtype)
        if not cls.exists(location):
            try:
                return cls.create(location, model, root, dtype=dtype)
            except StoreExistsError:
                pass  # another process created it since: open it like any existing store
        st = cls.open(location, writable=True)
        try:
            st.check_model(model)
            if Path(st.root).resolve() != Path(root).resolve():
                raise StoreError(
                    f"store {st.location} indexes archive {st.root}, not {Path(root).resolve()}; "
                    f"use another {st.location_hint} for another archive")
            if dtype != st.dtype:
                raise StoreError(f"store {st.location} holds {st.dtype}, not {dtype}")
        except BaseException:
            st.close()
            raise
        return st

    # ----------------------------------------------------------------- identity
    @property
    @abstractmethod
    def location(self) -> str:
        """Where the store is, for messages (a path, or a URI without its password)."""

    location_hint: ClassVar[str] = "--store"

    @property
    def dim(self) -> int:
        return self.manifest.dim

    @property
    def dtype(self) -> str:
        return self.manifest.dtype

    @property
    def root(self) -> str:
        """The archive folder that item paths are relative to."""
        return self.manifest.root

    def check_model(self, model: ModelInfo) -> None:
        """Raise :class:`ModelMismatchError` unless ``model`` embeds into this store's space."""
        mine = self.manifest.model
        nb, ob = mine.preprocessing.get("band_count"), model.preprocessing.get("band_count")
        if not mine.same_space(model) and nb is not None and ob is not None and nb != ob:
            raise ModelMismatchError(
                f"store {self.location} holds {mine.name!r} descriptors of {nb}-band items, "
                f"but these items have {ob} bands: index them into a new store (one band "
                "count per store), or use an RGB model (e.g. --model classic) for both")
        if not mine.same_space(model):
            raise ModelMismatchError(
                f"store {self.location} was built with model {mine.name!r} (arch {mine.arch}, "
                f"weights {mine.fingerprint[:19]}…, dim {mine.dim}), but model {model.name!r} "
                f"(arch {model.arch}, weights {model.fingerprint[:19]}…, dim {model.dim}) was "
                "given; use the same model or a new store")

    def resolve_path(self, rel: str) -> Path:
        """Absolute path of an item's file, refusing anything outside the archive root. A chip
        (``scene.tif#window=COL,ROW,W,H``, :mod:`rscir.ingest.units`) resolves to its scene,
        a multi-asset STAC item (``b04.tif#item=ID``) to its first band file."""
        root = Path(self.root).resolve()
        head, sep, frag = rel.partition("#")
        if sep and frag.startswith(("window=", "item=")):
            rel = head
        p = (root / rel).resolve()
        if p != root and root not in p.parents:
            raise InvalidArgumentError(f"path {rel!r} is outside the archive root")
        return p

    @property
    @abstractmethod
    def local_dir(self) -> Path:
        """A local folder for this store's reports and derived artifacts."""

    def artifact_dir(self, name: str) -> Path:
        """``local_dir/artifacts/<name>`` (ANN indexes, caches), created on demand."""
        if not name or "/" in name or name.startswith("."):
            raise InvalidArgumentError(f"bad artifact name {name!r}")
        d = self.local_dir / "artifacts" / name
        d.mkdir(parents=True, exist_ok=True)
        return d

    # ----------------------------------------------------------------- writing
    def add(self, embeddings: np.ndarray, items: pd.DataFrame | list[dict[str, Any]]) -> np.ndarray:
        """Append rows atomically; returns their item ids.

        A path already in the store is superseded and keeps its id; new paths get fresh ids."""
        self._require_writable()
        emb = np.asarray(embeddings)
        df = normalize_items(items)
        if emb.ndim != 2 or emb.shape[1] != self.dim:
            raise InvalidArgumentError(f"embeddings must be (n, {self.dim}), got {emb.shape}")
        if len(df) != emb.shape[0]:
            raise InvalidArgumentError(f"{emb.shape[0]} embeddings but {len(df)} items")
        if df["path"].duplicated().any():
            raise InvalidArgumentError("duplicate paths within one add()")
        if not np.isfinite(emb).all():
            raise InvalidArgumentError("embeddings contain NaN or inf")
        if len(df) == 0:
            return np.zeros(0, np.int64)
        # moments are sums over the values as stored
        return self._add(emb.astype(DTYPES[self.dtype]), df)

    def _require_writable(self) -> None:
        if not self.writable:
            raise StoreError(f"store {self.location} is open read-only")

    @abstractmethod
    def _add(self, embeddings: np.ndarray, items: pd.DataFrame) -> np.ndarray:
        """Commit validated rows (already in the store dtype) in one atomic step; their ids."""

    @abstractmethod
    def compact(self) -> None:
        """Finish a bulk load (merge segments, build indexes); a no-op when nothing to do."""

    # ----------------------------------------------------------------- reading
    @abstractmethod
    def __len__(self) -> int: ...

    @property
    @abstractmethod
    def generation(self) -> int:
        """Bumped by every commit: derived data (ANN indexes, caches) records it."""

    @abstractmethod
    def moments(self) -> Moments:
        """Sums (n, Σx, Σxxᵀ) over the live embeddings, for exact WeiCom normalization."""

    @property
    @abstractmethod
    def items(self) -> pd.DataFrame:
        """Metadata of every live item (the store's columns)."""

    @property
    @abstractmethod
    def embeddings(self) -> np.ndarray:
        """(N, d) live embeddings in ``items`` order (a memmap or fetched; for tools and tests)."""

    @property
    def scan_embeddings(self) -> np.ndarray:
        """``embeddings`` as exact scans read them (a backend may keep a faster equal copy)."""
        return self.embeddings

    @property
    def ids(self) -> np.ndarray:
        return self.items["id"].to_numpy()

    @abstractmethod
    def items_for_ids(self, ids: Sequence[int] | np.ndarray) -> pd.DataFrame:
        """Metadata of these ids, in the order given; :class:`UnknownItemError` otherwise."""

    def columns_for_ids(self, ids: Sequence[int] | np.ndarray, names: Sequence[str]
                        ) -> dict[str, list[Any]]:
        """Values of these metadata columns for these ids (in the order given) as lists, as
        ``items_for_ids(ids)[name].tolist()`` gives them: what hits are built from."""
        df = self.items_for_ids(ids)
        return {name: df[name].tolist() for name in names}

    @abstractmethod
    def vectors_for_ids(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """(n, d) float32 embeddings of these ids, in the order given."""

    @abstractmethod
    def id_of_file(self, rel: str, size: int, mtime_ns: int) -> int | None:
        """The id of the item indexed from this file, when it is unchanged (size and mtime)."""

    def files(self) -> pd.DataFrame:
        """``path, size, mtime_ns`` of every item: what resuming an ingestion compares."""
        return self.items[["path", "size", "mtime_ns"]]

    def refresh(self) -> bool:
        """Pick up commits of other processes; True when the store changed."""
        return False

    def filter_index(self) -> FilterIndex:
        """Vectorized item arrays for :meth:`ItemFilter.mask` (built once per generation)."""
        gen = self.generation
        cached: tuple[int, FilterIndex] | None = getattr(self, "_filter_cache", None)
        if cached is None or cached[0] != gen:
            cached = (gen, FilterIndex.of(self.items))
            self._filter_cache = cached
        return cached[1]

    def page(self, offset: int, limit: int, where: ItemFilter | None = None
             ) -> tuple[int, pd.DataFrame]:
        """(number of items passing ``where``, the ``limit`` of them from ``offset``)."""
        items = self.items
        if where is not None and not where.is_empty():
            items = items[where.mask(self.filter_index())]
        return len(items), items.iloc[offset : offset + limit]

    def coverage(self) -> dict[str, Any] | None:
        """The archive's extent as a GeoJSON polygon (the convex hull of every footprint's
        bounds, WGS84), or None when no item is georeferenced."""
        b = self.filter_index().bounds
        b = b[np.isfinite(b).all(axis=1)]
        if not len(b):
            return None
        import shapely
        from shapely.geometry import mapping

        corners = np.concatenate([b[:, [0, 1]], b[:, [2, 1]], b[:, [2, 3]], b[:, [0, 3]]])
        hull = shapely.multipoints(np.unique(corners, axis=0)).convex_hull
        return dict(mapping(hull))

    def label_counts(self) -> list[tuple[str, int]]:
        """Every label in ``label`` or ``labels`` with its item count, sorted by name."""
        items = self.items
        per_item = [set(ls) | ({lab} if lab else set())
                    for lab, ls in zip(items["label"], items["labels"], strict=True)]
        vc = pd.Series([x for s in per_item for x in s], dtype=object).value_counts()
        return sorted(((str(k), int(v)) for k, v in vc.items()), key=lambda t: t[0])

    def info(self) -> dict[str, Any]:
        """A summary for ``rscir info`` and the HTTP API."""
        items = self.items
        return {
            "path": self.location,
            "backend": self.backend,
            "root": self.root,
            "items": len(self),
            "dim": self.dim,
            "dtype": self.dtype,
            "generation": self.generation,
            **self._info_extra(),
            "model": self.manifest.model.to_dict(),
            "rscir_version": self.manifest.rscir_version,
            "classes": int(items["label"].dropna().nunique()),
            "georeferenced": int(items["lon"].notna().sum()),
        }

    def _info_extra(self) -> dict[str, Any]:
        return {}

    # ----------------------------------------------------------------- integrity
    @classmethod
    @abstractmethod
    def verify_at(cls, location: str | os.PathLike[str]) -> VerifyReport:
        """Check the whole store at ``location`` without changing it (``rscir verify``)."""

    @classmethod
    @abstractmethod
    def repair_at(cls, location: str | os.PathLike[str], *, purge: bool = False) -> RepairReport:
        """Rebuild what can be rebuilt, set aside the rest (``rscir repair``)."""

    # ----------------------------------------------------------------- closing
    @abstractmethod
    def close(self) -> None:
        """Release the writer lock and connections (idempotent)."""

    def __enter__(self: S) -> S:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
