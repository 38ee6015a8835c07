"""The Python API in a few calls: index a folder, open a store with its model, search.

    >>> import rscir
    >>> rscir.index("tiles/", "tiles.rscir", model="rscir-tiny")        # doctest: +SKIP
    >>> s = rscir.open_searcher("tiles.rscir")                           # doctest: +SKIP
    >>> s.search(image="tiles/pool/pool01.jpg", text="kidney-shaped", lam=0.5).to_frame()  # +SKIP
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .encoders.base import Encoder
from .encoders.builtin import default_registry
from .encoders.registry import ModelRegistry
from .errors import ModelUnavailableError
from .ingest.images import IndexReport, index_folder
from .search.searcher import Searcher
from .stores.directory import Store
from .stores.postgres.store import is_pg_uri


def load_encoder_for_store(
    store: Store,
    *,
    model: str | None = None,
    arch: str | None = None,
    checkpoint: str | None = None,
    device: str = "auto",
    registry: ModelRegistry | None = None,
    **kwargs: Any,
) -> Encoder:
    """The encoder a store was built with (from its manifest), or the one given, checked to
    embed into the store's space (else :class:`ModelMismatchError`)."""
    reg = registry or default_registry()
    info = store.manifest.model
    if model is None and arch is None and checkpoint is None:
        src = info.source or ""
        if src and os.path.isabs(src):
            if not os.path.isfile(src):
                raise ModelUnavailableError(
                    f"store {store.path} was built from checkpoint {src}, which is missing; "
                    "pass --checkpoint FILE with the same weights"
                )
            checkpoint = src
        if info.name in reg.specs:
            model = info.name
        else:
            arch = info.arch
    elif checkpoint is not None and model is None and arch is None:
        if info.name in reg.specs:
            model = info.name
        else:
            arch = info.arch
    enc = reg.load(model, arch=arch, checkpoint=checkpoint, device=device, **kwargs)
    store.check_model(enc.info)
    return enc


def open_searcher(
    store_dir: str | os.PathLike[str], *, strategy: str = "auto", **model_kwargs: Any
) -> Searcher:
    """Open a store read-only together with its model (a directory, or a postgresql:// URI);
    ``strategy`` as in :class:`Searcher` (mapped to the Postgres search modes there)."""
    if is_pg_uri(store_dir):  # Postgres/pgvector store: rscir.pgstore (issue 7)
        from .stores.postgres.store import open_pg_searcher

        return open_pg_searcher(str(store_dir), strategy=strategy, **model_kwargs)  # type: ignore[return-value]
    store = Store.open(store_dir)
    try:
        enc = load_encoder_for_store(store, **model_kwargs)
    except Exception:
        store.close()
        raise
    return Searcher(store, enc, strategy=strategy)


def index(
    folder: str | os.PathLike[str],
    store_dir: str | os.PathLike[str],
    *,
    model: str | None = None,
    arch: str | None = None,
    checkpoint: str | None = None,
    device: str = "auto",
    encoder: Encoder | None = None,
    **kwargs: Any,
) -> IndexReport:
    """Index or resume indexing ``folder`` into ``store_dir``. With an existing store and no
    model given, the store's own model is used."""
    if is_pg_uri(store_dir):  # Postgres/pgvector store: rscir.pgstore (issue 7)
        from .stores.postgres.store import index_folder_pg

        return index_folder_pg(folder, store_dir, model=model, arch=arch, checkpoint=checkpoint,  # type: ignore[arg-type]
                               device=device, encoder=encoder, **kwargs)
    if encoder is None:
        if model is None and arch is None and (Path(store_dir) / "manifest.json").exists():
            st = Store.open(store_dir)
            encoder = load_encoder_for_store(st, checkpoint=checkpoint, device=device)
        else:
            encoder = default_registry().load(model, arch=arch, checkpoint=checkpoint, device=device)
    return index_folder(folder, store_dir, encoder, **kwargs)
