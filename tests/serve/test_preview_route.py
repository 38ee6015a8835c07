"""POST /preview (the page's picture of an upload the browser cannot show) and the offline /docs
assets, through the real app."""

from __future__ import annotations

import io

import numpy as np
import pytest
from conftest import make_image_folder
from PIL import Image

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from rscir.ingest import index_folder  # noqa: E402
from rscir.ingest.images import load_image  # noqa: E402
from rscir.search import Searcher  # noqa: E402
from rscir.serve import ServeConfig, create_app  # noqa: E402
from rscir.stores import DirectoryStore  # noqa: E402


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory, tiny_encoder):
    base = tmp_path_factory.mktemp("preview")
    root = make_image_folder(base / "archive", {"beach": 2, "forest": 2}, size=24)
    index_folder(root, base / "store", tiny_encoder, num_workers=0, progress=False)
    app = create_app(Searcher(DirectoryStore.open(base / "store"), tiny_encoder),
                     ServeConfig(max_pixels=600 * 600))
    with TestClient(app) as c:
        yield c


def geotiff(path, bands: np.ndarray):
    import rasterio
    from rasterio.transform import Affine

    c, h, w = bands.shape
    with rasterio.open(path, "w", driver="GTiff", width=w, height=h, count=c,
                       dtype=str(bands.dtype), crs="EPSG:4326",
                       transform=Affine(0.001, 0, 10, 0, -0.001, 45)) as ds:
        ds.write(bands)
    return path


def post(client, data: bytes, name: str = "x.tif"):
    return client.post("/preview", files={"image": (name, data, "application/octet-stream")})


def test_preview_is_the_decoded_upload_as_png(client, tmp_path) -> None:
    arr = np.random.default_rng(0).integers(0, 255, (3, 30, 50), dtype=np.uint8)
    tif = geotiff(tmp_path / "a.tif", arr)
    r = post(client, tif.read_bytes())
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.headers["cache-control"] == "no-store"
    png = np.asarray(Image.open(io.BytesIO(r.content)))
    assert png.shape == (30, 50, 3)
    np.testing.assert_array_equal(png, np.transpose(arr, (1, 2, 0)))  # lossless, same pixels
    np.testing.assert_array_equal(png, np.asarray(load_image(tif)[0]))


def test_preview_is_at_most_512_px(client) -> None:
    buf = io.BytesIO()
    Image.new("RGB", (550, 275), (10, 200, 30)).save(buf, "PNG")
    r = post(client, buf.getvalue(), "big.png")
    assert r.status_code == 200
    im = Image.open(io.BytesIO(r.content))
    assert im.size == (512, 256) and im.getpixel((100, 100)) == (10, 200, 30)


def test_preview_errors_are_clean(client) -> None:
    r = post(client, b"plain text, not a picture", "notes.png")
    assert r.status_code == 415 and "not an image" in r.json()["detail"]
    assert post(client, b"").status_code == 422
    buf = io.BytesIO()
    Image.new("RGB", (700, 700)).save(buf, "PNG")  # over this server's 600×600 pixel cap
    assert post(client, buf.getvalue(), "huge.png").status_code == 413
    r = client.post("/preview", content=b"\x89PNG", headers={"content-type": "image/png"})
    assert r.status_code == 415 and "multipart" in r.json()["detail"]
    r = client.post("/preview", files={"query": (None, "{}")})  # multipart, no image part
    assert r.status_code == 422 and "part 'image'" in r.json()["detail"]


def test_docs_assets_come_from_the_package(client) -> None:
    page = client.get("/docs")
    assert page.status_code == 200
    for asset in ("/static-docs/swagger-ui-bundle.js", "/static-docs/swagger-ui.css",
                  "/static-docs/favicon.png"):
        assert asset in page.text
        r = client.get(asset)
        assert r.status_code == 200 and len(r.content) > 100, asset
    assert "http://" not in page.text and "https://" not in page.text
    csp = page.headers["content-security-policy"]
    assert "connect-src 'self'" in csp and "https:" not in csp
