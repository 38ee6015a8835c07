"""The Python API in a few calls: index a folder, open a store with its model, search.

    >>> import rscir
    >>> rscir.index("tiles/", "tiles.rscir", model="rscir-tiny")        # doctest: +SKIP
    >>> s = rscir.open_searcher("tiles.rscir")                           # doctest: +SKIP
    >>> s.search(image="tiles/pool/pool01.jpg", text="kidney-shaped", lam=0.5).to_frame()  # +SKIP

A store is a directory or a ``postgresql://`` URI everywhere (:func:`rscir.stores.open_store`).
"""

from __future__ import annotations

import os
from typing import Any

from .encoders.base import BandLayout, Encoder
from .encoders.builtin import default_registry
from .encoders.registry import ModelRegistry
from .ingest.pipeline import IndexReport
from .scoring.methods import FusionOptions
from .search.searcher import Searcher
from .stores.base import EmbeddingStore
from .stores.uri import existing_model, open_store


def load_encoder_for_store(
    store: EmbeddingStore,
    *,
    model: str | None = None,
    arch: str | None = None,
    checkpoint: str | None = None,
    device: str = "auto",
    registry: ModelRegistry | None = None,
    **kwargs: Any,
) -> Encoder:
    """The encoder a store was built with (from its manifest), or the one given, checked to
    embed into the store's space (else :class:`~rscir.errors.ModelMismatchError`)."""
    reg = registry or default_registry()
    model, arch, checkpoint = reg.args_for_store(store.manifest.model, model=model, arch=arch,
                                                 checkpoint=checkpoint)
    enc = reg.load(model, arch=arch, checkpoint=checkpoint, device=device, **kwargs)
    layout = BandLayout.of(store.manifest.model)
    if layout is not None:  # all-band models: set up for the store's bands
        enc = enc.for_bands(layout)
    store.check_model(enc.info)
    return enc


def open_searcher(
    store: str | os.PathLike[str] | EmbeddingStore, *, strategy: str = "auto",
    fusion: FusionOptions | None = None, **model_kwargs: Any,
) -> Searcher:
    """Open a store read-only (a directory or a ``postgresql://`` URI) together with its model;
    ``strategy`` and ``fusion`` (word lists, query-expansion depth) as in
    :class:`~rscir.search.Searcher`."""
    st = store if isinstance(store, EmbeddingStore) else open_store(store)
    try:
        enc = load_encoder_for_store(st, **model_kwargs)
        return Searcher(st, enc, strategy=strategy, fusion=fusion)
    except BaseException:
        st.close()
        raise


def index(
    folder: str | os.PathLike[str],
    store: str | os.PathLike[str] | EmbeddingStore,
    *,
    model: str | None = None,
    arch: str | None = None,
    checkpoint: str | None = None,
    device: str = "auto",
    precision: str = "auto",
    encoder: Encoder | None = None,
    num_workers: int | None = None,
    **options: Any,
) -> IndexReport:
    """Index or resume indexing ``folder`` into ``store`` on this machine. With an existing
    store and no model given, the store's own model is used. ``options`` are
    :class:`~rscir.ingest.pipeline.IngestOptions` fields (labels, dtype, segment_size, ...);
    for a Ray cluster see :func:`rscir.ingest.ray_data.index_folder_ray`. ``precision`` bf16
    or int8 runs open_clip image towers faster on CPU, slightly lossy (docs: benchmarks)."""
    from .ingest.local import index_folder

    if encoder is None:
        reg = default_registry()
        info = existing_model(store)
        if info is not None:
            model, arch, checkpoint = reg.args_for_store(info, model=model, arch=arch,
                                                         checkpoint=checkpoint)
        encoder = reg.load(model, arch=arch, checkpoint=checkpoint, device=device,
                           precision=precision)
    return index_folder(folder, store, encoder, num_workers=num_workers, **options)
