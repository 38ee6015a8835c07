"""A server that no upload or client can exhaust: hostile uploads through the API, and slow or
half-open connections against a real uvicorn server (header and body deadlines, connection cap).
Memory under concurrent worst-case uploads is measured by benchmarks/upload_memory.py."""

from __future__ import annotations

import io
import json
import socket
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import make_image_folder
from PIL import Image

pytest.importorskip("fastapi")
import httpx  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from rscir.search import Searcher  # noqa: E402
from rscir.serve import ServeConfig, create_app  # noqa: E402
from rscir.serve.server import ServerThread  # noqa: E402
from rscir.serve.uploads import UploadDecoder, UploadLimits  # noqa: E402
from rscir.stores import DirectoryStore  # noqa: E402

EPS = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n"
       b"newpath 0 0 moveto 10 10 lineto stroke\n%%EOF\n")


@pytest.fixture(scope="module")
def searcher(tmp_path_factory: pytest.TempPathFactory, tiny_encoder) -> Searcher:
    base = tmp_path_factory.mktemp("limits")
    root = make_image_folder(base / "archive", {"beach": 3, "forest": 3})
    files = sorted(p for p in root.rglob("*") if p.suffix in {".png", ".jpg"})
    emb = tiny_encoder.encode_images([Image.open(p).convert("RGB") for p in files])
    items = [{"path": p.relative_to(root).as_posix(), "label": p.parent.name} for p in files]
    st = DirectoryStore.create(base / "store", tiny_encoder.info, root, dtype="float32")
    st.add(emb, items)
    st.close()
    return Searcher(DirectoryStore.open(base / "store"), tiny_encoder)


@pytest.fixture(scope="module")
def client(searcher):
    with TestClient(create_app(searcher), raise_server_exceptions=False) as c:
        yield c


def post_upload(c, data: bytes, name: str = "q.png", ctype: str = "image/png"):
    return c.post("/search", files={"image": (name, data, ctype)},
                  data={"query": json.dumps({"method": "image", "k": 2})})


def encode(im: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt)
    return buf.getvalue()


# ----------------------------------------------------------------------------- uploads
@pytest.mark.parametrize("data, name, ctype", [
    (EPS, "x.eps", "application/postscript"),
    (EPS, "x.png", "image/png"),  # the name and type claimed do not matter
    (b"%!PS-Adobe-3.0\nshowpage\n", "x.ps", "application/postscript"),
    (b"%PDF-1.4\n%%EOF\n", "x.pdf", "application/pdf"),
])
def test_eps_ps_pdf_are_415(client, data: bytes, name: str, ctype: str) -> None:
    r = post_upload(client, data, name, ctype)
    assert r.status_code == 415 and "JPEG, PNG, TIFF" in r.json()["detail"]


def test_thin_png_is_422_at_once(client) -> None:
    data = encode(Image.new("L", (20, 2_500_000)), "PNG")
    t0 = time.perf_counter()
    r = post_upload(client, data)
    assert time.perf_counter() - t0 < 2.0
    assert r.status_code == 422 and "20×2500000" in r.json()["detail"]


def test_large_upload_is_reduced_and_searchable(client, searcher) -> None:
    """A 4000×3000 JPEG is searched as its 683×512 reduction (the same vector)."""
    rng = np.random.default_rng(0)
    arr = np.kron(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8),
                  np.ones((100, 100, 1), np.uint8))
    data = encode(Image.fromarray(arr), "JPEG")
    r = post_upload(client, data, "big.jpg", "image/jpeg")
    assert r.status_code == 200, r.text
    small = UploadDecoder().decode(data)
    assert small.size == (683, 512)
    ref = searcher.search(image=small, method="image", k=2)
    got = r.json()["results"][0]["hits"]
    assert [h["id"] for h in got] == [h.id for h in ref.hits]
    np.testing.assert_allclose([h["score"] for h in got], [h.score for h in ref.hits], atol=1e-6)


def test_info_reports_upload_limits(searcher) -> None:
    cfg = ServeConfig(max_side=3000, max_aspect=4.0)
    with TestClient(create_app(searcher, cfg)) as c:
        lim = c.get("/info").json()["limits"]
        assert lim["max_side"] == 3000 and lim["max_aspect"] == 4.0
        r = post_upload(c, encode(Image.new("RGB", (500, 100)), "PNG"))
        assert r.status_code == 422 and "4 times" in r.json()["detail"]


def test_decode_budget_through_the_api(searcher) -> None:
    """A decode that alone exceeds the budget is 413; one that waits too long is 503 with
    Retry-After."""
    cfg = ServeConfig(decode_memory_mb=20)
    app = create_app(searcher, cfg)
    with TestClient(app, raise_server_exceptions=False) as c:
        big = encode(Image.new("RGB", (2000, 2000)), "PNG")  # ~32 MB to decode
        r = post_upload(c, big)
        assert r.status_code == 413 and "needs about" in r.json()["detail"]
        api = app.state.api
        api.decoder = UploadDecoder(UploadLimits(decode_memory=40 * 2**20, wait_s=0.2))
        with api.decoder.budget.reserve(30 * 2**20, timeout=1):
            r = post_upload(c, encode(Image.new("RGB", (64, 64), (1, 2, 3)), "PNG"))
        assert r.status_code == 503 and r.headers["retry-after"] == "5"
        r = post_upload(c, encode(Image.new("RGB", (64, 64), (1, 2, 3)), "PNG"))
        assert r.status_code == 200


# ----------------------------------------------------------------------------- connections
@pytest.fixture(scope="module")
def live(searcher):
    """A real server with short deadlines: headers 1 s, body 1.5 s, at most 40 connections."""
    app = create_app(searcher, ServeConfig(body_timeout_s=1.5))
    with ServerThread(app, header_timeout_s=1.0, max_connections=40) as url:
        host, port = url.removeprefix("http://").split(":")
        yield url, (host, int(port))


def read_until_closed(s: socket.socket, limit_s: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and when it closed."""
    t0 = time.monotonic()
    s.settimeout(limit_s)
    got = b""
    try:
        while chunk := s.recv(4096):
            got += chunk
    except TimeoutError:
        pytest.fail(f"the server held the connection for over {limit_s} s (got {got[:80]!r})")
    except ConnectionResetError:
        pass
    return got, time.monotonic() - t0


def test_silent_connection_is_dropped(live) -> None:
    _, addr = live
    with socket.create_connection(addr) as s:
        got, took = read_until_closed(s, 5)
    assert got.startswith(b"HTTP/1.1 408") and 0.8 < took < 3


def test_headers_a_byte_a_time_are_dropped(live) -> None:
    _, addr = live
    req = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    with socket.create_connection(addr) as s:
        t0 = time.monotonic()
        sent = 0
        try:
            for b in req:
                s.sendall(bytes([b]))
                sent += 1
                time.sleep(0.2)
                if time.monotonic() - t0 > 5:
                    break
        except (BrokenPipeError, ConnectionResetError):
            pass
        got, _ = read_until_closed(s, 5)
        took = time.monotonic() - t0
    assert sent < len(req) and b"200 OK" not in got and took < 3


def test_slow_body_gets_408(live) -> None:
    _, addr = live
    with socket.create_connection(addr) as s:
        s.sendall(b"POST /search HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 200\r\n\r\n{")
        t0 = time.monotonic()
        got = b""
        s.settimeout(0.2)
        while time.monotonic() - t0 < 6 and b"\r\n\r\n" not in got:
            try:
                s.sendall(b" ")
                got += s.recv(4096)
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                break
        took = time.monotonic() - t0
        rest, _ = read_until_closed(s, 5)
    head = (got + rest).split(b"\r\n\r\n")[0].lower()
    assert head.startswith(b"http/1.1 408") and b"connection: close" in head
    assert b"did not arrive within 1.5 s" in got + rest and 1.2 < took < 4


def test_slow_second_request_on_a_kept_alive_connection(live) -> None:
    _, addr = live
    with socket.create_connection(addr) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        s.settimeout(5)
        assert s.recv(4096).startswith(b"HTTP/1.1 200")
        t0 = time.monotonic()
        try:
            for b in b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n":
                s.sendall(bytes([b]))
                time.sleep(0.2)
        except (BrokenPipeError, ConnectionResetError):
            pass
        read_until_closed(s, 5)
        assert time.monotonic() - t0 < 3


def test_300_half_open_connections_do_not_hold_the_server(live) -> None:
    """Past the connection cap requests get 503 at once (never a hang); the header deadline
    then drops every half-open connection and the server answers again."""
    url, addr = live
    socks = [socket.create_connection(addr) for _ in range(300)]
    try:
        for s in socks[:5]:
            s.sendall(b"GET /heal")  # half a request line
        t0 = time.monotonic()
        r = httpx.get(url + "/healthz", timeout=5)
        assert r.status_code == 503 and time.monotonic() - t0 < 1
        closed = 0
        deadline = time.monotonic() + 6
        for s in socks:
            s.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                while s.recv(4096):
                    pass
                closed += 1  # end of file: the server closed it
            except ConnectionResetError:
                closed += 1
            except TimeoutError:
                break
        assert closed == 300
        assert httpx.get(url + "/healthz", timeout=5).status_code == 200
    finally:
        for s in socks:
            s.close()


def test_cli_rejects_bad_limits(tmp_path: Path) -> None:
    from rscir.cli import main

    for flags in (["--max-aspect", "0.5"], ["--header-timeout", "0"], ["--body-timeout", "-1"],
                  ["--decode-memory-mb", "0"], ["--max-side", "0"], ["--max-connections", "0"]):
        assert main(["serve", str(tmp_path), "--port", "0", *flags]) == 2, flags
