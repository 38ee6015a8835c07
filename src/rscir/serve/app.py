"""The HTTP API (FastAPI) and the web page for composed search.

``create_app(source)`` takes a store directory, a ``postgresql://`` URI or an open
:class:`~rscir.search.Searcher`; every store backend is served through the same Searcher. The
model is loaded once, when the app is made; searches run in worker threads (numpy and torch
release the GIL), bounded by ``ServeConfig.workers``.
"""

from __future__ import annotations

import io
import logging
import math
import pathlib
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from typing import IO, Annotated, Any, Literal

import anyio
import numpy as np
import orjson
from fastapi import FastAPI, HTTPException, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..caching import LRU
from ..errors import InvalidArgumentError, QueryError, UnknownItemError
from ..scoring import method_names, method_spec
from ..search.export import MEDIA_TYPES, render
from ..search.results import SearchResult
from ..search.searcher import Searcher, resolve_method
from ..stores.filters import ItemFilter
from .middleware import SECURITY_HEADERS, AccessLog, BodyDeadline, BodyLimit, BodyTooLarge
from .uploads import UploadDecoder, UploadError, UploadLimits, spool_upload, upload_token

log = logging.getLogger("rscir.serve")

# /docs (Swagger UI) runs an inline script and loads its assets from the package
# (fastapi-offline ships them), never from a CDN; every other route keeps the strict policy of
# middleware.SECURITY_HEADERS.
DOCS_CSP = ("default-src 'self'; script-src 'self' 'unsafe-inline'; "
            "style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; font-src 'self' data:; "
            "worker-src 'self' blob:; connect-src 'self'; frame-ancestors 'none'")
DOCS_ASSETS = "/static-docs"  # where the Swagger UI files (fastapi-offline) are mounted
SECURITY_HEADERS_CSP = dict(SECURITY_HEADERS)[b"content-security-policy"].decode()
PREVIEW_MAX = 512  # longest side of an upload's PNG preview (POST /preview)
MAX_ID = 2**63 - 1  # item ids are int64


@dataclass(frozen=True)
class ServeConfig:
    """Limits and knobs of one server."""

    max_upload_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 50_000_000
    max_side: int = 20_000  # pixels on either side of an upload
    max_aspect: float = 20.0  # long side / short side of an upload
    decode_memory_mb: int = 1024  # all concurrent upload decodes together (uploads.py)
    body_timeout_s: float = 60.0  # a request body must arrive within this
    max_k: int = 10_000
    max_lams: int = 21
    max_texts: int = 8
    max_text_chars: int = 500
    workers: int = 8
    thumb_max: int = 512
    thumb_cache: int = 1024
    upload_cache: int = 128
    text_cache: int = 512
    basemap: str | None = None  # a tile URL template ({z}/{x}/{y}) for the page's map
    basemap_attribution: str | None = None


# ----------------------------------------------------------------------------- request models
ItemId = Annotated[int, Path(ge=0, le=MAX_ID, description="archive item id")]


class FilterSpec(BaseModel):
    """Which items may be returned (all given conditions hold); hits keep their unfiltered
    scores. Geometry is WGS84 longitude/latitude (RFC 7946)."""

    model_config = ConfigDict(extra="forbid")
    labels: list[str] = Field(default_factory=list, max_length=64,
                              description="items with any of these class/labels")
    all_labels: bool = Field(False, description="items must have every one of `labels`")
    bbox: tuple[float, float, float, float] | None = Field(
        None, description="[west, south, east, north]: the footprint intersects it "
                          "(west > east crosses the antimeridian)")
    within: dict[str, Any] | None = Field(
        None, description="a GeoJSON geometry (or Feature) the footprint intersects")
    start: str | None = Field(None, max_length=40, description="acquired on or after (ISO, UTC)")
    end: str | None = Field(None, max_length=40,
                            description="acquired on or before (ISO, UTC; a date is its whole day)")
    ids: list[int] | None = Field(None, max_length=100_000, description="only these item ids")
    exclude_ids: list[int] = Field(default_factory=list, max_length=100_000,
                                   description="never these item ids")

    @field_validator("labels")
    @classmethod
    def _labels(cls, v: list[str]) -> list[str]:
        if any(not s or len(s) > 200 for s in v):
            raise InvalidArgumentError("labels must be 1..200 characters")
        return v

    def to_filter(self) -> ItemFilter | None:
        """The store filter (bad values raise InvalidArgumentError, answered with 422)."""
        f = ItemFilter(labels=tuple(self.labels), all_labels=self.all_labels, bbox=self.bbox,
                       within=self.within, start=self.start, end=self.end,
                       ids=None if self.ids is None else tuple(self.ids),
                       exclude_ids=tuple(self.exclude_ids))
        return None if f.is_empty() else f


class SearchRequest(BaseModel):
    """A composed query. The image is an archive item (``item_id``), an uploaded file (multipart
    part ``image``), or ``image_token``: the token a previous upload returned (saves re-sending
    the file while λ, text or method change). Without ``method``, image and text use WeiCom,
    an image alone is image-only and a text alone text-only."""

    model_config = ConfigDict(extra="forbid")
    item_id: int | None = Field(None, ge=0, le=MAX_ID)
    image_token: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")
    texts: list[str] = Field(default_factory=list, description="text modifiers (averaged)")
    method: str | None = Field(None, max_length=40, description="fusion (see /info's methods)")
    lam: float = Field(0.5, ge=0.0, le=1.0, description="0 = image only, 1 = text only")
    lams: list[float] | None = Field(None, min_length=1, description="several λ (a λ strip)")
    k: int = Field(20, ge=1, description="results per λ")
    offset: int = Field(0, ge=0, le=1_000_000, description="skip this many (paging)")
    filter: FilterSpec | None = None
    exclude_query: bool = True
    format: Literal["json", "geojson", "csv", "parquet"] = Field(
        "json", description="json (this response), or a file: geojson (RFC 7946), csv, parquet "
                            "(GeoParquet)")

    @field_validator("lams")
    @classmethod
    def _lams(cls, v: list[float] | None) -> list[float] | None:
        if v is not None and not all(0.0 <= x <= 1.0 for x in v):
            raise InvalidArgumentError("every λ must be in [0, 1]")
        return v


class Hit(BaseModel):
    rank: int
    id: int
    path: str
    score: float
    label: str | None
    labels: list[str]
    sim_image: float | None = Field(None, description="cosine similarity to the query image")
    sim_text: float | None = Field(None, description="cosine similarity to the query text")
    norm_image: float | None = Field(None, description="WeiCom: Φ(z) of sim_image in the archive")
    norm_text: float | None = Field(None, description="WeiCom: Φ(z) of sim_text in the archive")
    lon: float | None
    lat: float | None
    datetime: str | None = None
    crs: str | None = None
    footprint: dict[str, Any] | None = Field(None, description="GeoJSON geometry, WGS84")
    width: int | None
    height: int | None
    thumbnail: str


class LamResult(BaseModel):
    lam: float
    method: str
    offset: int = 0
    hits: list[Hit]


class SearchResponse(BaseModel):
    query: dict[str, Any]
    results: list[LamResult]
    took_ms: float


class ItemOut(BaseModel):
    id: int
    path: str
    label: str | None
    labels: list[str]
    lon: float | None
    lat: float | None
    width: int
    height: int
    size: int
    thumbnail: str


# ----------------------------------------------------------------------------- helpers
def _num(v: Any) -> float | None:
    return None if v is None or (isinstance(v, float) and not math.isfinite(v)) else float(v)


def _label(v: Any) -> str | None:
    """None for a missing label (a string column reads it back as NaN)."""
    return None if v is None or (isinstance(v, float) and v != v) else str(v)


def _json_response(obj: Any) -> Response:
    """A JSON response encoded by orjson (several times faster than the json module on hit
    lists; NaN and infinities, which JSON lacks, become null rather than a 500)."""
    return Response(orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY),
                    media_type="application/json")


def _item_out(r: Any, *, size: bool = True) -> dict[str, Any]:
    """An item's metadata (a row of ``itertuples``); ``size`` (file bytes) for /items only."""
    out = {
        "id": int(r.id), "path": str(r.path), "label": _label(r.label),
        "labels": [str(x) for x in r.labels], "lon": _num(r.lon), "lat": _num(r.lat),
        "width": int(r.width), "height": int(r.height),
        "thumbnail": f"/items/{int(r.id)}/thumbnail",
    }
    if size:
        out["size"] = int(r.size)
    return out


def _page_csp(basemap: str | None) -> str:
    """The page's content security policy: the server's own, plus the basemap's tile origin
    (``{s}`` subdomains become a wildcard) when one is configured."""
    csp = SECURITY_HEADERS_CSP
    if basemap:
        from urllib.parse import urlsplit

        u = urlsplit(basemap)
        host = u.netloc.replace("{s}", "*")
        origin = f"{u.scheme}://{host}" if "{" not in host else f"{u.scheme}:"
        csp = csp.replace("img-src 'self'", f"img-src 'self' {origin}", 1)
    return csp


def _web_dir() -> pathlib.Path:
    """The static page (package data ``rscir/serve/web``)."""
    return pathlib.Path(str(resources.files(__package__) / "web"))


class _Api:
    """The app's state and handlers (kept on ``app.state.api``, nothing global)."""

    def __init__(self, searcher: Searcher, cfg: ServeConfig) -> None:
        self.searcher = searcher
        self.store = searcher.store
        self.cfg = cfg
        self.limiter = anyio.CapacityLimiter(cfg.workers)
        self.decoder = UploadDecoder(UploadLimits(
            max_bytes=cfg.max_upload_bytes, max_pixels=cfg.max_pixels, max_side=cfg.max_side,
            max_aspect=cfg.max_aspect, decode_memory=cfg.decode_memory_mb * 1024 * 1024))
        self.uploads = LRU(cfg.upload_cache)
        self.thumbs = LRU(cfg.thumb_cache)

    async def run(self, fn: Any, *args: Any) -> Any:
        return await anyio.to_thread.run_sync(fn, *args, limiter=self.limiter)

    def check(self, req: SearchRequest) -> SearchRequest:
        """The request within this server's limits (an unset k is capped, not refused)."""
        c = self.cfg
        if "k" not in req.model_fields_set and req.k > c.max_k:
            req = req.model_copy(update={"k": c.max_k})
        if req.k > c.max_k:
            raise HTTPException(422, f"k must be <= {c.max_k}")
        if req.lams is not None and len(req.lams) > c.max_lams:
            raise HTTPException(422, f"at most {c.max_lams} λ values")
        if len(req.texts) > c.max_texts or any(len(t) > c.max_text_chars for t in req.texts):
            raise HTTPException(422, f"at most {c.max_texts} texts of {c.max_text_chars} characters")
        if req.item_id is not None and req.image_token is not None:
            raise HTTPException(422, "give item_id or image_token, not both")
        return req

    def text_vec(self, texts: list[str]) -> np.ndarray | None:
        if not any(t.strip() for t in texts):
            return None
        return self.searcher.text_vector(texts)  # cached by the searcher

    def info(self) -> dict[str, Any]:
        self.store.refresh()
        return {**self.store.info(), "coverage": self.store.coverage(),
                "basemap": self.cfg.basemap, "basemap_attribution": self.cfg.basemap_attribution}

    def page(self, offset: int, limit: int, label: str | None) -> tuple[int, Any]:
        self.store.refresh()
        return self.store.page(offset, limit, ItemFilter(labels=(label,)) if label else None)

    def labels(self) -> list[tuple[str, int]]:
        self.store.refresh()
        return self.store.label_counts()

    def upload_vec(self, data: IO[bytes]) -> tuple[str, np.ndarray]:
        token = upload_token(data)
        vec = self.uploads.get(token)
        if vec is None:
            img = self.decoder.decode(data)
            vec = self.searcher.encode_image(img)
            self.uploads.put(token, vec)
        return token, vec

    def search(self, req: SearchRequest, upload: IO[bytes] | None) -> dict[str, Any]:
        t0 = time.perf_counter()
        img = None
        token = req.image_token
        if upload is not None:
            if req.item_id is not None or req.image_token is not None:
                raise HTTPException(422, "give an uploaded image, item_id or image_token, not several")
            token, img = self.upload_vec(upload)
        elif token is not None:
            img = self.uploads.get(token)
            if img is None:
                raise HTTPException(410, "image_token unknown or expired: upload the image again")
        elif req.item_id is not None:
            try:
                img = self.searcher.item_vector(req.item_id)
            except UnknownItemError:
                raise HTTPException(404, f"no item with id {req.item_id}") from None
        lams = req.lams if req.lams is not None else [req.lam]
        txt = self.text_vec(req.texts)
        try:
            method = resolve_method(req.method, img is not None, txt is not None, lams)
        except QueryError as e:
            raise HTTPException(422, str(e).replace("image= or item_id=", "an upload, item_id or "
                                "image_token").replace("text=", "texts")) from None
        where = req.filter.to_filter() if req.filter else None
        exclude = req.item_id if req.exclude_query else None
        spec = method_spec(method)
        res = self.searcher.search_ids(img if spec.needs_image else None,
                                       txt if spec.needs_text else None, method, lams,
                                       req.k + req.offset, exclude, where)
        results = [SearchResult(self.searcher.hits(r, offset=req.offset),
                                method, float(lam), list(req.texts), req.item_id, req.offset)
                   for lam, r in zip(lams, res, strict=True)]
        query = {"item_id": req.item_id, "image_token": token, "texts": req.texts,
                 "method": method, "k": req.k, "offset": req.offset,
                 "filter": None if where is None else where.to_dict()}
        if req.format != "json":
            return {"file": render(results, req.format, query), "format": req.format}
        return {
            "query": query,
            # vars(): the hit's fields in order, without asdict's deep copies
            "results": [{"lam": r.lam, "method": r.method, "offset": r.offset,
                         "hits": [{**vars(h), "thumbnail": f"/items/{h.id}/thumbnail"}
                                  for h in r.hits]} for r in results],
            "took_ms": round((time.perf_counter() - t0) * 1e3, 2),
        }

    def item(self, item_id: int) -> dict[str, Any]:
        try:
            df = self.store.items_for_ids([item_id])
        except UnknownItemError:
            raise HTTPException(404, f"no item with id {item_id}") from None
        return _item_out(next(df.itertuples(index=False)))

    def thumbnail(self, item_id: int, size: int) -> bytes:
        from PIL import Image

        from ..errors import PathNotFoundError
        from ..ingest.images import DEFAULT_MAX_PIXELS, ImageDecodeError
        from ..ingest.render import item_image

        key = (item_id, size)
        hit = self.thumbs.get(key)
        if hit is not None:
            return hit
        try:
            rel = str(self.store.items_for_ids([item_id])["path"].iloc[0])
        except UnknownItemError:
            raise HTTPException(404, f"no item with id {item_id}") from None
        try:
            # archive files were accepted at ingestion: the ingestion cap, not the upload cap;
            # a chip renders as the chip, a patch as its RGB band stack
            img = item_image(self.store, rel, DEFAULT_MAX_PIXELS)
        except PathNotFoundError:  # no file in the archive (e.g. imported embeddings)
            raise HTTPException(404, "the item's file is missing from the archive") from None
        except ImageDecodeError as e:
            raise HTTPException(422, f"the item's file cannot be decoded: {e}") from None
        except ValueError:
            log.warning("refused item %s: its path %r leaves the archive root", item_id, rel)
            raise HTTPException(404, "the item's file is not inside the archive") from None
        img.thumbnail((size, size), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=85)
        data = buf.getvalue()
        self.thumbs.put(key, data)
        return data


def create_app(source: Any, config: ServeConfig | None = None, **model_kwargs: Any) -> FastAPI:
    """The FastAPI app serving ``source`` (store directory, ``postgresql://`` URI or searcher).

    ``model_kwargs`` (model, arch, checkpoint, device) pick the model when the store's own
    cannot be found."""
    from ..api import open_searcher

    cfg = config or ServeConfig()
    searcher = source if isinstance(source, Searcher) else open_searcher(source, **model_kwargs)
    api = _Api(searcher, cfg)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> Any:
        yield
        log.info("shutting down: closing the store")
        searcher.close()

    app = FastAPI(
        title="rscir",
        summary="Composed image retrieval (query image + text modifier) for remote sensing",
        version=_version(),
        lifespan=lifespan,
        docs_url=None,  # served by _install_docs from the package's files (works offline)
        redoc_url=None,
    )
    app.state.api = api

    # --------------------------------------------------------------- errors: never a trace
    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": _clean_errors(exc.errors())}, status_code=422)

    @app.exception_handler(BodyTooLarge)
    async def _too_large(request: Request, exc: BodyTooLarge) -> JSONResponse:
        return JSONResponse({"detail": f"request body over {cfg.max_upload_bytes} bytes"},
                            status_code=413)

    @app.exception_handler(UploadError)
    async def _upload(request: Request, exc: UploadError) -> JSONResponse:
        return JSONResponse({"detail": exc.detail}, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> JSONResponse:
        rid = request.scope.get("state", {}).get("request_id", "-")
        log.error("unhandled error in %s %s (rid=%s)", request.method, request.url.path, rid,
                  exc_info=exc)
        return JSONResponse({"detail": "internal server error", "request_id": rid},
                            status_code=500)

    # --------------------------------------------------------------- routes
    page_csp = _page_csp(cfg.basemap)

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(_web_dir() / "index.html", media_type="text/html",
                            headers={"content-security-policy": page_csp})

    app.mount("/static", StaticFiles(directory=_web_dir()), name="static")

    _install_docs(app)

    @app.get("/healthz", summary="liveness")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok"}

    @app.get("/info", summary="model, store size, dimensions, limits")
    async def info() -> dict[str, Any]:
        d = await api.run(api.info)
        return {**_jsonable(d), "methods": list(method_names()),
                "method_info": {n: method_spec(n).info() for n in method_names()},
                "limits": {"max_upload_bytes": cfg.max_upload_bytes, "max_pixels": cfg.max_pixels,
                           "max_side": cfg.max_side, "max_aspect": cfg.max_aspect,
                           "max_k": cfg.max_k, "max_lams": cfg.max_lams}}

    @app.get("/labels", summary="labels in the archive with item counts")
    async def labels() -> dict[str, Any]:
        pairs = await api.run(api.labels)
        return {"labels": [{"name": n, "count": c} for n, c in pairs]}

    @app.get("/items", summary="page through archive items")
    async def items(offset: int = Query(0, ge=0), limit: int = Query(50, ge=1, le=500),
                    label: str | None = Query(None, max_length=200)) -> dict[str, Any]:
        total, df = await api.run(api.page, offset, limit, label)
        return {"total": total, "offset": offset,
                "items": [_item_out(r) for r in df.itertuples(index=False)]}

    @app.get("/items/{item_id}", response_model=ItemOut, summary="an item's metadata")
    async def item(item_id: ItemId) -> dict[str, Any]:
        return await api.run(api.item, item_id)

    @app.get("/items/{item_id}/thumbnail", summary="an item's image as a JPEG thumbnail",
             response_class=Response, responses={200: {"content": {"image/jpeg": {}}}})
    async def thumbnail(item_id: ItemId, size: int = Query(256, ge=16, le=512)) -> Response:
        data = await api.run(api.thumbnail, item_id, min(size, cfg.thumb_max))
        return Response(data, media_type="image/jpeg",
                        headers={"Cache-Control": "private, max-age=3600"})

    @app.post(
        "/preview", summary="a PNG preview of an image file (TIFF, multi-band) as search sees it",
        response_class=Response, responses={200: {"content": {"image/png": {}}}},
        description=("multipart/form-data with the image in part `image`: decoded as /search "
                     "decodes uploads (any raster the indexer accepts), returned as a PNG of at "
                     f"most {PREVIEW_MAX} px a side, for browsers that cannot show the file."),
        openapi_extra={"requestBody": {"required": True, "content": {"multipart/form-data": {
            "schema": {"type": "object", "required": ["image"],
                       "properties": {"image": {"type": "string", "format": "binary"}}}}}}},
    )
    async def preview(request: Request) -> Response:
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "multipart/form-data":
            raise HTTPException(415, "send multipart/form-data with the image in part 'image'")
        _, data = await _read_multipart(request, cfg)
        try:
            png = await api.run(_preview_png, api.decoder, data)
        finally:
            data.close()
        return Response(png, media_type="image/png", headers={"Cache-Control": "no-store"})

    @app.post(
        "/search",
        response_model=SearchResponse,
        summary="composed search",
        description=(
            "JSON body (a SearchRequest), or multipart/form-data with the query image in part "
            "`image` and the SearchRequest as JSON in part `query`. The response carries an "
            "`image_token` for uploads: send it instead of the file for the next search."),
        openapi_extra={"requestBody": {"required": True, "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/SearchRequest"}},
            "multipart/form-data": {"schema": {
                "type": "object", "required": ["image"],
                "properties": {"image": {"type": "string", "format": "binary"},
                               "query": {"type": "string",
                                         "description": "SearchRequest as JSON"}}}},
        }}},
    )
    async def search(request: Request) -> Response:
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        upload: IO[bytes] | None = None
        if ctype == "application/json":
            raw = await request.body()
            qtext = raw.decode("utf-8", errors="replace")
        elif ctype == "multipart/form-data":
            qtext, upload = await _read_multipart(request, cfg)
        else:
            raise HTTPException(415, "send application/json or multipart/form-data")
        try:
            try:
                req = SearchRequest.model_validate_json(qtext or "{}")
            except ValidationError as e:
                raise HTTPException(422, _clean_errors(e.errors())) from None
            req = api.check(req)
            out = await api.run(api.search, req, upload)
        except UnknownItemError as e:
            raise HTTPException(404, str(e)) from None
        except (QueryError, ValueError) as e:  # e.g. a method that needs text got none
            raise HTTPException(422, str(e)) from None
        finally:
            if upload is not None:
                upload.close()
        if "file" in out:
            fmt = out["format"]
            return Response(out["file"], media_type=MEDIA_TYPES[fmt], headers={
                "Content-Disposition": f'attachment; filename="rscir-results.{fmt}"'})
        return _json_response(out)

    _install_openapi(app)
    app.add_middleware(BodyLimit, max_bytes=cfg.max_upload_bytes + 64 * 1024)
    app.add_middleware(BodyDeadline, timeout_s=cfg.body_timeout_s)
    app.add_middleware(AccessLog)  # outermost: logs 413s too
    return app


async def _read_multipart(request: Request, cfg: ServeConfig) -> tuple[str, IO[bytes]]:
    try:
        form = await request.form(max_files=1, max_fields=4, max_part_size=64 * 1024)
    except HTTPException as e:
        raise HTTPException(422, f"malformed multipart body: {e.detail}") from None
    try:
        q = form.get("query")
        qtext = q if isinstance(q, str) else "{}"
        f = form.get("image")
        if f is None or isinstance(f, str):
            raise HTTPException(422, "multipart search needs the query image in part 'image'")
        return qtext, await spool_upload(f, cfg.max_upload_bytes)  # on disk past 1 MB
    finally:
        await form.close()


def _clean_errors(errors: Any) -> list[dict[str, Any]]:
    """Validation errors without echoing whole inputs or internals."""
    out = []
    for e in errors:
        out.append({"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")),
                    "type": str(e.get("type", ""))})
    return out


def _jsonable(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _jsonable(v) for k, v in d.items()}
    if isinstance(d, list | tuple):
        return [_jsonable(v) for v in d]
    if isinstance(d, np.generic):
        return d.item()
    if isinstance(d, float) and not math.isfinite(d):
        return None
    return d


def _version() -> str:
    from .._version import __version__

    return __version__


def _install_openapi(app: FastAPI) -> None:
    """Add the request models that /search parses by hand to the OpenAPI components."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, summary=app.summary,
                             routes=app.routes)
        comps = schema.setdefault("components", {}).setdefault("schemas", {})
        js = SearchRequest.model_json_schema(ref_template="#/components/schemas/{model}")
        comps.update(js.pop("$defs", {}))
        comps["SearchRequest"] = js
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def _preview_png(decoder: UploadDecoder, data: IO[bytes]) -> bytes:
    """An upload decoded exactly as a query image is (so the preview is what search sees)."""
    from PIL import Image

    img = decoder.decode(data)
    img.thumbnail((PREVIEW_MAX, PREVIEW_MAX), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def _install_docs(app: FastAPI) -> None:
    """/docs (Swagger UI) from the files fastapi-offline ships, so it works with no internet;
    without that package it says where the schema is instead of loading a CDN. (No /redoc:
    ReDoc's side menu loads its logo from cdn.redoc.ly whatever the options.)"""
    try:
        import fastapi_offline

        assets: pathlib.Path | None = pathlib.Path(fastapi_offline.__file__).parent / "static"
    except ImportError:
        assets = None

    if assets is None or not (assets / "swagger-ui-bundle.js").is_file():
        note = ("<!doctype html><meta charset=utf-8><title>rscir API</title>"
                "<p>The interactive API docs need the <code>fastapi-offline</code> package "
                "(<code>pip install 'rscir[serve]'</code>). The schema is at "
                "<a href=\"/openapi.json\">/openapi.json</a>.</p>")

        @app.get("/docs", include_in_schema=False)
        async def no_docs() -> HTMLResponse:
            return HTMLResponse(note)

        return

    app.mount(DOCS_ASSETS, StaticFiles(directory=assets), name="static-docs")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        page = get_swagger_ui_html(
            openapi_url="/openapi.json", title="rscir API",
            swagger_js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{DOCS_ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{DOCS_ASSETS}/favicon.png",
            swagger_ui_parameters={"validatorUrl": None})
        page.headers["content-security-policy"] = DOCS_CSP
        return page
