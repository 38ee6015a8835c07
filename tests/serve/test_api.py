"""HTTP API (rscir.serve): results equal in-process search; every error path is a clean 4xx."""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from conftest import make_image_folder
from PIL import Image

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from rscir.search import ItemFilter, Searcher  # noqa: E402
from rscir.serve import ServeConfig, create_app  # noqa: E402
from rscir.stores import DirectoryStore  # noqa: E402

SECRET = b"TOP-SECRET-OUTSIDE-THE-ARCHIVE"


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory, tiny_encoder) -> dict:
    """A store over a small labelled, georeferenced archive, plus three hostile items: one whose
    path climbs out of the root, one that is a symlink to a file outside it, one absolute."""
    base = tmp_path_factory.mktemp("serve")
    root = make_image_folder(base / "archive", {"beach": 6, "forest": 5, "harbor": 5})
    outside = base / "outside"
    outside.mkdir()
    Image.new("RGB", (8, 8), (255, 0, 0)).save(outside / "secret.png")
    (outside / "secret.txt").write_bytes(SECRET)
    (root / "beach" / "link.png").symlink_to(outside / "secret.png")
    (root / "linkdir").symlink_to(outside, target_is_directory=True)
    files = sorted(p for p in root.rglob("*") if p.suffix in {".png", ".jpg"}
                   and p.resolve().is_relative_to(root.resolve()) and not p.is_symlink())
    images = [Image.open(p).convert("RGB") for p in files]
    emb = tiny_encoder.encode_images(images)
    rng = np.random.default_rng(1)
    items = [{"path": p.relative_to(root).as_posix(), "label": p.parent.name,
              "labels": [p.parent.name, "coast"] if p.parent.name != "forest" else ["forest"],
              "lon": float(rng.uniform(0, 10)), "lat": float(rng.uniform(40, 50)),
              "width": 48, "height": 48, "size": p.stat().st_size} for p in files]
    evil = [{"path": "../outside/secret.png", "label": "evil"},
            {"path": "beach/link.png", "label": "evil"},
            {"path": "linkdir/secret.png", "label": "evil"},
            {"path": str(outside / "secret.png"), "label": "evil"},
            {"path": "beach/missing.png", "label": "evil"}]
    st = DirectoryStore.create(base / "store", tiny_encoder.info, root, dtype="float32")
    st.add(np.concatenate([emb, emb[:5]]), items + evil)
    st.close()
    store = DirectoryStore.open(base / "store")
    ids = {r.path: int(r.id) for r in store.items.itertuples()}
    query = base / "query.png"  # an image that is not in the archive
    Image.fromarray(rng.integers(0, 255, (40, 52, 3), dtype=np.uint8)).save(query)
    return {"root": root, "store": store, "ids": ids, "query": query, "n": len(store),
            "emb": np.concatenate([emb, emb[:5]]), "items": items + evil}


@pytest.fixture(scope="module")
def searcher(archive, tiny_encoder) -> Searcher:
    return Searcher(archive["store"], tiny_encoder)


@pytest.fixture(scope="module")
def client(searcher):
    with TestClient(create_app(searcher)) as c:
        yield c


@pytest.fixture(scope="module")
def strict(searcher):
    """An app with small limits, for the size and pixel caps."""
    cfg = ServeConfig(max_upload_bytes=50_000, max_pixels=100_000, max_k=10, max_lams=3,
                      max_texts=2, max_text_chars=40)
    with TestClient(create_app(searcher, cfg), raise_server_exceptions=False) as c:
        yield c


def png_bytes(w: int, h: int, seed: int = 0) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def fake_png_header(w: int, h: int) -> bytes:
    """A valid PNG signature + IHDR claiming w×h pixels, with one tiny IDAT: a 'bomb' header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(
            ">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


def upload(c: TestClient, data: bytes, query: dict | str | None = None, name: str = "q.png",
           ctype: str = "image/png"):
    form = {} if query is None else {"query": query if isinstance(query, str) else json.dumps(query)}
    return c.post("/search", files={"image": (name, data, ctype)}, data=form)


def hits(resp, i: int = 0) -> tuple[list[int], list[float]]:
    r = resp.json()["results"][i]["hits"]
    return [h["id"] for h in r], [h["score"] for h in r]


def assert_clean_error(r, status: int) -> None:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.text
    assert "Traceback" not in body and 'File "' not in body and "site-packages" not in body
    assert "detail" in r.json()


# ----------------------------------------------------------------------------- happy paths
def test_healthz_info_and_openapi(client, archive) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    info = client.get("/info").json()
    assert info["items"] == archive["n"] == 21
    assert info["dim"] == 32 and info["model"]["name"] == "rscir-tiny"
    assert info["backend"] == "embedded" and "weicom" in info["methods"]
    spec = client.get("/openapi.json").json()
    for path in ("/search", "/items/{item_id}", "/items/{item_id}/thumbnail", "/healthz", "/info"):
        assert path in spec["paths"], path
    body = spec["paths"]["/search"]["post"]["requestBody"]["content"]
    assert set(body) == {"application/json", "multipart/form-data"}
    props = spec["components"]["schemas"]["SearchRequest"]["properties"]
    assert {"item_id", "texts", "method", "lam", "lams", "k", "filter"} <= set(props)
    docs = client.get("/docs")
    assert docs.status_code == 200 and "/openapi.json" in docs.text
    assert "/static-docs/swagger-ui-bundle.js" in docs.text  # offline: from the package
    assert "cdn.jsdelivr.net" not in docs.text + docs.headers["content-security-policy"]
    assert "'unsafe-inline'" not in client.get("/").headers["content-security-policy"]


def test_search_by_item_equals_in_process_searcher(client, searcher, archive) -> None:
    qid = archive["ids"]["beach/beach01.jpg"]
    for method, lam in [("weicom", 0.3), ("weicom", 0.8), ("average", 0.5), ("sum", 0.5),
                        ("product", 0.5)]:
        r = client.post("/search", json={"item_id": qid, "texts": ["a harbor with boats"],
                                         "method": method, "lam": lam, "k": 7})
        assert r.status_code == 200, r.text
        ref = searcher.search(item_id=qid, text="a harbor with boats", method=method, lam=lam, k=7)
        ids, scores = hits(r)
        assert ids == [h.id for h in ref.hits]
        np.testing.assert_allclose(scores, [h.score for h in ref.hits], rtol=0, atol=1e-9)
        assert qid not in ids  # the query item is excluded by default
        assert [h["rank"] for h in r.json()["results"][0]["hits"]] == list(range(1, 8))
    r = client.post("/search", json={"item_id": qid, "method": "image", "k": 3,
                                     "exclude_query": False})
    assert hits(r)[0][0] == qid and hits(r)[1][0] == pytest.approx(1.0, abs=1e-5)


def test_lambda_list_equals_one_search_per_lambda(client, archive) -> None:
    q = {"item_id": archive["ids"]["forest/forest02.jpg"], "texts": ["sand", "sea"], "k": 5}
    r = client.post("/search", json={**q, "lams": [0.0, 0.5, 1.0]})
    assert [x["lam"] for x in r.json()["results"]] == [0.0, 0.5, 1.0]
    for i, lam in enumerate([0.0, 0.5, 1.0]):
        assert hits(r, i) == hits(client.post("/search", json={**q, "lam": lam}))


def test_upload_equals_searching_the_file_and_token_reuse(client, searcher, archive) -> None:
    data = archive["query"].read_bytes()
    r = upload(client, data, {"texts": ["forest"], "lam": 0.4, "k": 6})
    assert r.status_code == 200, r.text
    ref = searcher.search(image=archive["query"], text="forest", lam=0.4, k=6)
    ids, scores = hits(r)
    assert ids == [h.id for h in ref.hits]
    np.testing.assert_allclose(scores, [h.score for h in ref.hits], atol=1e-6)
    token = r.json()["query"]["image_token"]
    assert len(token) == 64
    again = client.post("/search", json={"image_token": token, "texts": ["forest"], "lam": 0.4,
                                         "k": 6})
    assert hits(again) == hits(r)
    gone = client.post("/search", json={"image_token": "0" * 64, "texts": ["x"]})
    assert_clean_error(gone, 410)


def test_filters_equal_filtering_the_full_ranking(client, searcher, archive) -> None:
    qid = archive["ids"]["harbor/harbor00.png"]
    base = {"item_id": qid, "texts": ["green trees"], "lam": 0.5}
    full = client.post("/search", json={**base, "k": archive["n"]}).json()["results"][0]["hits"]
    bbox = (2.0, 42.0, 8.0, 49.0)
    cases = [
        ({"labels": ["harbor"]}, lambda h: h["label"] == "harbor"),
        ({"labels": ["coast"]}, lambda h: "coast" in h["labels"]),
        ({"bbox": list(bbox)}, lambda h: h["lon"] is not None and bbox[0] <= h["lon"] <= bbox[2]
         and bbox[1] <= h["lat"] <= bbox[3]),
        ({"labels": ["forest"], "bbox": list(bbox)},
         lambda h: h["label"] == "forest" and h["lon"] is not None
         and bbox[0] <= h["lon"] <= bbox[2] and bbox[1] <= h["lat"] <= bbox[3]),
    ]
    for spec, keep in cases:
        want = [h["id"] for h in full if keep(h)][:4]
        assert want, spec
        r = client.post("/search", json={**base, "k": 4, "filter": spec})
        assert r.status_code == 200, r.text
        assert hits(r)[0] == want, spec
        ref = searcher.search(item_id=qid, text="green trees", lam=0.5, k=4,
                              where=ItemFilter(labels=tuple(spec.get("labels", ())),
                                               bbox=tuple(spec["bbox"]) if "bbox" in spec else None))
        assert [h.id for h in ref.hits] == want


def test_items_metadata_and_thumbnail(client, archive) -> None:
    iid = archive["ids"]["forest/forest04.jpg"]
    meta = client.get(f"/items/{iid}").json()
    assert meta["path"] == "forest/forest04.jpg" and meta["label"] == "forest"
    assert meta["thumbnail"] == f"/items/{iid}/thumbnail"
    r = client.get(f"/items/{iid}/thumbnail", params={"size": 32})
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    im = Image.open(io.BytesIO(r.content))
    assert im.format == "JPEG" and max(im.size) == 32
    page = client.get("/items", params={"label": "harbor", "limit": 3}).json()
    assert page["total"] == 5 and len(page["items"]) == 3
    labels = {d["name"]: d["count"] for d in client.get("/labels").json()["labels"]}
    assert labels["beach"] == 6 and labels["coast"] == 11 and labels["evil"] == 5


def test_concurrent_searches_agree(client, archive) -> None:
    ids = sorted(archive["ids"].values())[:8]
    reqs = [{"item_id": i, "texts": [t], "lam": lam, "k": 5}
            for i in ids for t in ("sea", "trees") for lam in (0.2, 0.7)]
    serial = [hits(client.post("/search", json=q)) for q in reqs]
    with ThreadPoolExecutor(8) as ex:
        parallel = list(ex.map(lambda q: hits(client.post("/search", json=q)), reqs * 2))
    assert parallel == serial * 2


# ----------------------------------------------------------------------------- error paths
@pytest.mark.parametrize("body, status", [
    (b"{not json", 422),
    (b'{"item_id": 0, "texts": ["a"],', 422),
    (b"[1, 2]", 422),
    (b'"just a string"', 422),
    (b"\xff\xfe\x00garbage", 422),
    (b'{"item_id": 0, "texts": ["a"], "surprise": 1}', 422),
    (b'{"item_id": 0, "texts": ["a"], "method": "magic"}', 422),
    (b'{"item_id": 0, "texts": ["a"], "lam": 1.5}', 422),
    (b'{"item_id": 0, "texts": ["a"], "lam": NaN}', 422),
    (b'{"item_id": 0, "texts": ["a"], "lams": [0.1, 2]}', 422),
    (b'{"item_id": 0, "texts": ["a"], "lams": []}', 422),
    (b'{"item_id": 0, "texts": ["a"], "k": 0}', 422),
    (b'{"item_id": 0, "texts": ["a"], "k": 100000}', 422),
    (b'{"item_id": -3, "texts": ["a"]}', 422),
    (b'{"item_id": 99999999999999999999999, "texts": ["a"]}', 422),
    (b'{"item_id": "zero", "texts": ["a"]}', 422),
    (b'{"item_id": 0, "texts": "a"}', 422),
    (b'{"item_id": 0, "texts": ["a"], "filter": {"bbox": [5, 5, 1, 1]}}', 422),
    (b'{"item_id": 0, "texts": ["a"], "filter": {"bbox": [1, 2, 3]}}', 422),
    (b'{"item_id": 0, "texts": ["a"], "filter": {"labels": [""]}}', 422),
    (b'{"item_id": 0, "image_token": "' + b"a" * 64 + b'", "texts": ["a"]}', 422),
    (b'{"image_token": "../../etc/passwd", "texts": ["a"]}', 422),
    (b'{"item_id": 0, "method": "weicom"}', 422),    # weicom needs a text (at this λ)
    (b'{"texts": ["a"], "method": "weicom"}', 422),  # weicom needs an image
    (b'{"item_id": 0, "method": "sum", "texts": ["   "]}', 422),  # a blank text is no text
    (b'{"texts": []}', 422),                         # no query at all
    (b'{"item_id": 0, "method": "nope", "texts": ["a"]}', 422),
    (b'{"item_id": 0, "k": 3}', 200),                # an image alone: image-only
    (b'{"texts": ["a"], "k": 3}', 200),              # a text alone: text-only
    (b'{"item_id": 0, "method": "weicom", "lam": 0, "k": 3}', 200),  # λ = 0: image only
    (b'{"item_id": 0, "texts": ["a"], "method": "image", "k": 3}', 200),
    (b'{"texts": ["a"], "method": "text", "k": 3}', 200),
    (b'{"item_id": 123456, "texts": ["a"]}', 404),
])
def test_search_json_errors(client, body: bytes, status: int) -> None:
    r = client.post("/search", content=body, headers={"content-type": "application/json"})
    if status == 200:
        assert r.status_code == 200 and len(hits(r)[0]) == 3
    else:
        assert_clean_error(r, status)


def test_request_limits(strict) -> None:
    ok = {"item_id": 0, "texts": ["a"]}
    assert strict.post("/search", json={**ok, "k": 10}).status_code == 200
    assert len(hits(strict.post("/search", json=ok))[0]) == 10  # an unset k is capped
    assert_clean_error(strict.post("/search", json={**ok, "k": 11}), 422)
    assert_clean_error(strict.post("/search", json={**ok, "lams": [0, 0.3, 0.6, 1]}), 422)
    assert_clean_error(strict.post("/search", json={**ok, "texts": ["a", "b", "c"]}), 422)
    assert_clean_error(strict.post("/search", json={**ok, "texts": ["x" * 41]}), 422)


def test_content_types_and_methods(client) -> None:
    assert_clean_error(client.post("/search", content=b'{"item_id": 0, "texts": ["a"]}',
                                   headers={"content-type": "text/plain"}), 415)
    assert_clean_error(client.post("/search", content=b'{"item_id": 0}'), 415)
    assert_clean_error(client.get("/search"), 405)
    assert_clean_error(client.get("/no/such/route"), 404)


@pytest.mark.parametrize("data, name, ctype, status", [
    (b"", "empty.png", "image/png", 422),
    (b"%PDF-1.4 definitely not an image" * 4, "doc.pdf", "application/pdf", 415),
    (b"GIF89a" + b"\x00" * 5, "tiny.gif", "image/gif", 415),
    (b"<svg xmlns='http://www.w3.org/2000/svg'/>", "x.svg", "image/svg+xml", 415),
    (b"#!/bin/sh\nrm -rf /\n", "x.png", "image/png", 415),
])
def test_upload_not_an_image(client, data: bytes, name: str, ctype: str, status: int) -> None:
    assert_clean_error(upload(client, data, {"texts": ["a"]}, name, ctype), status)


def test_upload_truncated_and_bombs(strict) -> None:
    good = png_bytes(64, 64)
    r = upload(strict, good, {"texts": ["a"]})
    assert r.status_code == 200, r.text
    assert_clean_error(upload(strict, good[: len(good) // 2], {"texts": ["a"]}), 422)
    # declared size 100000 × 100000 in a 100-byte file: refused from the header alone
    assert_clean_error(upload(strict, fake_png_header(100_000, 100_000), {"texts": ["a"]}), 413)
    # a real, highly compressible image over the pixel cap (400 × 400 = 160k > 100k)
    buf = io.BytesIO()
    Image.new("RGB", (400, 400)).save(buf, "PNG")
    assert len(buf.getvalue()) < 50_000
    assert_clean_error(upload(strict, buf.getvalue(), {"texts": ["a"]}), 413)
    # a TIFF over the pixel cap goes through the rasterio path and is refused there too
    tif = io.BytesIO()
    Image.new("RGB", (400, 400)).save(tif, "TIFF", compression="tiff_deflate")
    assert_clean_error(upload(strict, tif.getvalue(), {"texts": ["a"]}, "big.tif", "image/tiff"),
                       413)


def test_upload_too_many_bytes(strict) -> None:
    big = png_bytes(200, 200)  # ~120 kB of noise, over the 50 kB cap
    assert len(big) > 50_000
    assert_clean_error(upload(strict, big, {"texts": ["a"]}), 413)
    # no Content-Length (chunked): counted while streaming in
    body = b"x" * 200_000

    def chunks():
        for i in range(0, len(body), 8192):
            yield body[i : i + 8192]

    r = strict.post("/search", content=chunks(), headers={"content-type": "application/json"})
    assert_clean_error(r, 413)
    r = strict.post("/search", content=b"{}", headers={"content-type": "application/json",
                                                        "content-length": "999999999"})
    assert_clean_error(r, 413)


def test_multipart_errors(client) -> None:
    png = png_bytes(16, 16)
    assert_clean_error(client.post("/search", data={"query": '{"texts": ["a"]}'},
                                   files={"other": ("a.png", png, "image/png")}), 422)
    assert_clean_error(upload(client, png, "{broken"), 422)
    assert_clean_error(upload(client, png, {"texts": ["a"], "item_id": 0}), 422)
    assert_clean_error(upload(client, png, {"texts": ["a"], "k": -1}), 422)
    r = client.post("/search", content=b"--xx\r\nnot multipart at all",
                    headers={"content-type": "multipart/form-data; boundary=xx"})
    assert r.status_code in (400, 422) and "Traceback" not in r.text


def test_item_errors(client) -> None:
    assert_clean_error(client.get("/items/123456"), 404)
    assert_clean_error(client.get("/items/123456/thumbnail"), 404)
    for bad in ("-1", "abc", "1.5", "99999999999999999999999", "..%2F..%2Fetc%2Fpasswd"):
        r = client.get(f"/items/{bad}")
        assert r.status_code in (404, 422), bad
        assert "Traceback" not in r.text
        assert client.get(f"/items/{bad}/thumbnail").status_code in (404, 422)
    assert_clean_error(client.get("/items/0/thumbnail", params={"size": 100000}), 422)
    assert_clean_error(client.get("/items", params={"limit": 0}), 422)


def test_thumbnails_never_leave_the_archive(client, archive) -> None:
    ids = archive["ids"]
    outside = archive["root"].parent / "outside" / "secret.png"
    for path in ("../outside/secret.png", "beach/link.png", "linkdir/secret.png", str(outside),
                 "beach/missing.png"):
        r = client.get(f"/items/{ids[path]}/thumbnail")
        assert_clean_error(r, 404)
        assert "outside" not in r.text and str(archive["root"]) not in r.text
    # the static file route refuses traversal too (encoded, so no client normalizes it away)
    for url in ("/static/..%2F..%2F..%2Foutside%2Fsecret.txt", "/static/%2e%2e/app.py",
                "/static/..%2fserver.py", "/static//etc/passwd"):
        r = client.get(url)
        assert r.status_code == 404, url
        assert SECRET not in r.content and b"import" not in r.content


def test_internal_errors_hide_details_and_are_logged(searcher, caplog) -> None:
    app = create_app(searcher)
    real = app.state.api.searcher

    class Broken:
        """The real searcher, except that search crashes with a revealing message."""

        def __getattr__(self, name: str):
            return getattr(real, name)

        def search_ids(self, *a, **k):
            raise ZeroDivisionError("secret internal detail /etc/shadow")

    app.state.api.searcher = Broken()
    caplog.set_level(logging.INFO, logger="rscir.serve")
    with TestClient(app, raise_server_exceptions=False) as c:
        r = c.post("/search", json={"item_id": 0, "texts": ["a"]},
                   headers={"x-request-id": "req-abc-123"})
        assert c.get("/healthz").status_code == 200  # the server lives on
    assert r.status_code == 500
    assert r.json() == {"detail": "internal server error", "request_id": "req-abc-123"}
    assert "secret" not in r.text and "ZeroDivision" not in r.text
    assert any(rec.exc_info and rec.exc_info[0] is ZeroDivisionError
               and "req-abc-123" in rec.getMessage() for rec in caplog.records)


def test_request_log_and_headers(client, caplog) -> None:
    caplog.set_level(logging.INFO, logger="rscir.serve.access")
    r = client.get("/items/0", headers={"x-request-id": "abc123"})
    assert r.headers["x-request-id"] == "abc123"
    assert r.headers["x-content-type-options"] == "nosniff"
    assert "frame-ancestors 'none'" in r.headers["content-security-policy"]
    r2 = client.get("/items/123456")
    assert len(r2.headers["x-request-id"]) == 16
    lines = [rec.getMessage() for rec in caplog.records if rec.name == "rscir.serve.access"]
    assert any("GET /items/0 " in m and " 200 " in m and "rid=abc123" in m for m in lines)
    assert any("GET /items/123456 " in m and " 404 " in m for m in lines)


def test_web_page_is_served(client) -> None:
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    html = r.text
    for needle in ('<label for="text">', '<label for="lam">', 'id="file"', "/static/app.js",
                   'lang="en"', 'role="status"'):
        assert needle in html, needle
    assert client.get("/static/app.js").status_code == 200
    assert client.get("/static/style.css").status_code == 200


# ----------------------------------------------------------------------------- the command
def test_cli_serve_errors(tmp_path: Path) -> None:
    from rscir.cli import main

    assert main(["serve", str(tmp_path / "nope")]) == 2
    assert main(["serve", str(tmp_path), "--port", "70000"]) == 2


def test_cli_serve_runs_and_shuts_down_gracefully(archive) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "rscir.cli", "serve", str(archive["store"].path), "--port", "0",
         "--device", "cpu"], stderr=subprocess.PIPE, text=True, env=env)
    try:
        url = None
        lines = []
        deadline = time.monotonic() + 60
        while url is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            lines.append(line)
            if line.startswith("rscir serve: http://"):
                url = line.split()[2].rstrip("/")
        assert url and url.startswith("http://127.0.0.1:"), "".join(lines)
        import httpx

        deadline = time.monotonic() + 30
        while True:
            try:
                r = httpx.get(url + "/healthz", timeout=5)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline
                time.sleep(0.1)
        assert r.json() == {"status": "ok"}
        r = httpx.post(url + "/search", json={"item_id": 0, "texts": ["sea"], "k": 3}, timeout=30)
        assert r.status_code == 200 and len(r.json()["results"][0]["hits"]) == 3
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=30)[1]
        # uvicorn re-raises the signal once shut down cleanly: exit 0 or "killed by SIGTERM"
        assert proc.returncode in (0, -signal.SIGTERM), out
        assert "Application shutdown complete" in out
        assert "POST /search" in out and "closing the store" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ----------------------------------------------------------------------------- Postgres
@pytest.fixture(scope="module")
def pg_client(pg_uri, archive, tiny_encoder):
    """The same archive in Postgres, served from its URI (as `rscir serve postgresql://...`)."""
    from conftest import with_schema

    from rscir.stores.postgres import PostgresStore

    uri = with_schema(pg_uri, "serve_api")
    st = PostgresStore.create(uri, tiny_encoder.info, archive["root"], dtype="float32")
    try:
        st.add(archive["emb"], archive["items"])
    finally:
        st.close()
    with TestClient(create_app(uri, device="cpu")) as c:
        yield c


def test_postgres_backend_serves_the_same_results(pg_client, client, archive) -> None:
    info = pg_client.get("/info").json()
    assert info["backend"] == "postgres" and info["items"] == archive["n"]
    ids = archive["ids"]
    same_ids = {h["path"]: h["id"] for h in pg_client.get("/items", params={"limit": 500}
                                                            ).json()["items"]}
    assert same_ids == ids
    queries = [
        {"item_id": ids["beach/beach01.jpg"], "texts": ["boats"], "lam": 0.3, "k": 6},
        {"item_id": ids["forest/forest04.jpg"], "texts": ["sand"], "method": "average", "k": 5},
        {"item_id": ids["harbor/harbor00.png"], "texts": ["trees"], "lams": [0, 0.5, 1], "k": 4},
        {"item_id": ids["harbor/harbor00.png"], "texts": ["trees"], "k": 4,
         "filter": {"labels": ["coast"], "bbox": [1.0, 41.0, 9.0, 49.0]}},
        {"texts": ["a forest"], "method": "text", "k": 5},
    ]
    for q in queries:
        a, b = client.post("/search", json=q), pg_client.post("/search", json=q)
        assert a.status_code == b.status_code == 200, (q, b.text)
        for ra, rb in zip(a.json()["results"], b.json()["results"], strict=True):
            np.testing.assert_allclose([h["score"] for h in rb["hits"]],
                                       [h["score"] for h in ra["hits"]], atol=1e-5)
            # the same ids in the same order, but for near-duplicate items (equal in the
            # float16 embedded store, 1e-7 apart in the float32 Postgres one) in either order
            score_a = {h["id"]: h["score"] for h in ra["hits"]}
            for ha, hb in zip(ra["hits"], rb["hits"], strict=True):
                assert hb["id"] == ha["id"] or (
                    hb["id"] in score_a and abs(score_a[hb["id"]] - ha["score"]) <= 1e-5), q
    up_a = upload(client, archive["query"].read_bytes(), {"texts": ["sea"], "k": 5})
    up_b = upload(pg_client, archive["query"].read_bytes(), {"texts": ["sea"], "k": 5})
    assert hits(up_b)[0] == hits(up_a)[0]
    assert_clean_error(pg_client.post("/search", json={"item_id": 123456, "texts": ["a"]}), 404)
    assert_clean_error(pg_client.get("/items/123456"), 404)
    for path in ("../outside/secret.png", "beach/link.png", "linkdir/secret.png",
                 "beach/missing.png"):
        assert_clean_error(pg_client.get(f"/items/{ids[path]}/thumbnail"), 404)
    assert pg_client.get(f"/items/{ids['beach/beach01.jpg']}/thumbnail").status_code == 200
