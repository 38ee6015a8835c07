"""The web page, driven in headless Chromium (Debian's ``chromium`` via Playwright) against a real
uvicorn server on a free loopback port: what the page shows must be what the API returns.

Screenshots go to ``$RSCIR_TEST_ARTIFACTS`` (default ``out/test-artifacts/``, git-ignored).
Every page here runs with no internet: requests that leave the loopback are refused and
recorded, and a test fails if the page attempted any."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import numpy as np
import pytest
from conftest import REPO, make_image_folder
from PIL import Image

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
pytest.importorskip("fastapi")

from rscir.ingest import index_folder  # noqa: E402
from rscir.search import Searcher  # noqa: E402
from rscir.serve import create_app  # noqa: E402
from rscir.serve.server import ServerThread  # noqa: E402
from rscir.stores import DirectoryStore  # noqa: E402

CHROMIUM = os.environ.get("RSCIR_CHROMIUM") or shutil.which("chromium") \
    or shutil.which("chromium-browser")
# flags for a closed network and running as root (see the environment notes)
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--disable-dev-shm-usage"]

pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="Debian's chromium is not installed (scripts/system_deps.sh installs it; or set "
           "RSCIR_CHROMIUM to a Chromium binary)")


def artifacts_dir() -> Path:
    d = Path(os.environ.get("RSCIR_TEST_ARTIFACTS") or REPO / "out" / "test-artifacts")
    d.mkdir(parents=True, exist_ok=True)
    return d


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, tiny_encoder):
    base = tmp_path_factory.mktemp("web")
    root = make_image_folder(base / "archive", {"beach": 7, "forest": 7, "harbor": 7}, size=40)
    index_folder(root, base / "store", tiny_encoder, num_workers=0, progress=False)
    query = base / "my query.png"
    Image.fromarray(np.random.default_rng(5).integers(0, 255, (40, 40, 3), dtype=np.uint8)
                    ).save(query)
    app = create_app(Searcher(DirectoryStore.open(base / "store"), tiny_encoder))
    with ServerThread(app) as url:
        yield {"url": url, "query": query}


def write_geotiff(path: Path, bands: np.ndarray, lon: float, lat: float,
                  res: float = 0.001) -> Path:
    """A north-up EPSG:4326 GeoTIFF whose centre is (lon, lat)."""
    import rasterio
    from rasterio.transform import Affine

    c, h, w = bands.shape
    t = Affine(res, 0.0, lon - w * res / 2, 0.0, -res, lat + h * res / 2)
    with rasterio.open(path, "w", driver="GTiff", width=w, height=h, count=c,
                       dtype=str(bands.dtype), crs="EPSG:4326", transform=t) as ds:
        ds.write(bands)
    return path


GEO_CLASSES = ("farmland", "harbor", "residential")


def geo_position(ci: int, i: int) -> tuple[float, float]:
    """Where item i of class ci lies: a 5-column grid per class, classes offset a little."""
    return 10.0 + (i % 5) * 0.2 + ci * 0.05, 45.0 + (i // 5) * 0.15 + ci * 0.03


@pytest.fixture(scope="module")
def geo(tmp_path_factory: pytest.TempPathFactory, tiny_encoder):
    """60 georeferenced GeoTIFF tiles (3 classes of 20) served: more than one browse page."""
    base = tmp_path_factory.mktemp("geo")
    rng = np.random.default_rng(3)
    for ci, cls in enumerate(GEO_CLASSES):
        (base / "archive" / cls).mkdir(parents=True)
        colour = np.array([(ci * 67 + 40) % 256, (ci * 131 + 20) % 256, (ci * 29 + 60) % 256])
        for i in range(20):
            arr = np.clip(colour[:, None, None] + rng.integers(-40, 40, (3, 40, 40)), 0, 255)
            write_geotiff(base / "archive" / cls / f"{cls}_tile_{i:02d}.tif",
                          arr.astype(np.uint8), *geo_position(ci, i))
    index_folder(base / "archive", base / "store", tiny_encoder, num_workers=0, progress=False)
    app = create_app(Searcher(DirectoryStore.open(base / "store"), tiny_encoder))
    with ServerThread(app) as url:
        yield {"url": url, "base": base}


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


class Offline:
    """A page that may only reach the loopback: other requests are aborted and recorded, as are
    script errors and console errors (a CSP violation is one)."""

    def __init__(self, browser, width: int = 1280, height: int = 900) -> None:
        self.ctx = browser.new_context(viewport={"width": width, "height": height},
                                       accept_downloads=True)
        self.external: list[str] = []
        self.errors: list[str] = []
        self.ctx.route("**/*", self._route)
        self.page = self.ctx.new_page()
        self.page.set_default_timeout(20_000)
        self.page.on("pageerror", lambda e: self.errors.append(f"pageerror: {e}"))
        self.page.on("console", lambda m: m.type == "error" and not _expected_console(m.text)
                     and self.errors.append(f"console: {m.text}"))
        self.page.on("response", lambda r: r.status >= 400 and "/static" in r.url
                     and self.errors.append(f"asset {r.url}: HTTP {r.status}"))

    def _route(self, route) -> None:
        host = urlsplit(route.request.url).hostname or ""
        if host in ("127.0.0.1", "localhost", "::1"):
            route.continue_()
        else:
            self.external.append(route.request.url)
            route.abort()

    def close(self) -> None:
        self.ctx.close()
        assert not self.external, f"the page reached outside the loopback: {self.external}"
        assert not self.errors, self.errors


def _expected_console(text: str) -> bool:
    # a refused request (a test's deliberate bad upload) logs its HTTP status
    return "Failed to load resource: the server responded with a status of" in text


@pytest.fixture()
def offline(browser):
    pages: list[Offline] = []

    def make(**kw) -> Offline:
        pages.append(Offline(browser, **kw))
        return pages[-1]

    yield make
    for o in pages:
        o.close()


@pytest.fixture(scope="module")
def page(served, browser):
    o = Offline(browser)
    o.page.goto(served["url"] + "/")
    yield o.page
    o.close()


# The page keeps the request behind the grid in #results[data-request]; wait until it matches.
WAIT_FOR = """(want) => {
  const r = document.getElementById('results');
  if (r.dataset.state !== 'ready' || r.getAttribute('aria-busy') !== 'false') return false;
  if (!r.dataset.request) return false;
  const q = JSON.parse(r.dataset.request);
  return Object.entries(want).every(([k, v]) => JSON.stringify(q[k]) === JSON.stringify(v));
}"""

READ_GRID = """(els) => els.map((e) => ({
  id: Number(e.dataset.id), score: Number(e.dataset.score), rank: Number(e.dataset.rank),
  shown: (e.querySelector('.score') || {}).textContent, title: e.title,
  alt: e.querySelector('img').alt}))"""


def shown_request(page, **want) -> dict:
    page.wait_for_function(WAIT_FOR, arg=want)
    return json.loads(page.get_attribute("#results", "data-request"))


def grid(page, selector: str = "#results .hit") -> list[dict]:
    return page.eval_on_selector_all(selector, READ_GRID)


def api_hits(url: str, req: dict, upload: Path | None = None) -> list[list[tuple[int, float]]]:
    if upload is None:
        r = httpx.post(url + "/search", json=req, timeout=30)
    else:
        r = httpx.post(url + "/search", data={"query": json.dumps(req)}, timeout=30,
                       files={"image": (upload.name, upload.read_bytes(), "image/png")})
    assert r.status_code == 200, r.text
    return [[(h["id"], h["score"]) for h in res["hits"]] for res in r.json()["results"]]


def test_compose_slide_click_and_strip(page, served) -> None:
    url = served["url"]
    # the archive is browsable before any query
    page.wait_for_function("() => document.getElementById('results').dataset.view === 'browse'")
    assert len(grid(page, "#results .hit")) == 21
    assert "21 images" in page.text_content("#archive-info")

    # 1. upload a query image: no text yet, so image-only neighbours
    page.set_input_files("#file", str(served["query"]))
    req = shown_request(page, method="image", lam=0.5)
    assert "item_id" not in req and "image_token" not in req
    shown = [(g["id"], g["score"]) for g in grid(page)]
    assert shown == api_hits(url, req, upload=served["query"])[0]
    assert page.get_attribute("#query-img", "alt") == "Query image: uploaded file my query.png"

    # 2. type a modifier: the page now composes with WeiCom, re-using the upload's token
    page.fill("#text", "a harbor with boats")
    req = shown_request(page, method="weicom", texts=["a harbor with boats"], lam=0.5)
    token = req["image_token"]
    assert len(token) == 64

    # 3. move λ with the keyboard (two steps of 0.05): the grid follows, debounced
    page.focus("#lam")
    page.keyboard.press("ArrowRight")
    page.keyboard.press("ArrowRight")
    req = shown_request(page, method="weicom", texts=["a harbor with boats"], lam=0.6)
    assert page.text_content("#lam-value") == "0.60"
    assert req == {"texts": ["a harbor with boats"], "method": "weicom", "k": 24, "lam": 0.6,
                   "image_token": token}
    cards = grid(page)
    want = api_hits(url, {k: v for k, v in req.items() if k != "image_token"},
                    upload=served["query"])[0]
    assert [(c["id"], c["score"]) for c in cards] == want
    assert [(c["id"], c["score"]) for c in cards] == api_hits(url, req)[0]
    assert [c["rank"] for c in cards] == list(range(1, len(cards) + 1))
    assert len(cards) == 21  # the query is not an archive item: nothing excluded
    for c in cards:  # scores on the cards and in the hover text
        assert c["shown"] == f"{c['score']:.4f}"
        assert f"score {c['score']:.6f}" in c["title"] and f"id {c['id']}" in c["title"]
        assert c["alt"]
    page.screenshot(path=str(artifacts_dir() / "serve-grid.png"), full_page=True)

    # 4. click the third result: it becomes the query (by item id, excluded from its results)
    third = cards[2]
    page.click(f"#results .hit[data-id='{third['id']}']")
    req = shown_request(page, item_id=third["id"], lam=0.6)
    assert req == {"texts": ["a harbor with boats"], "method": "weicom", "k": 24, "lam": 0.6,
                   "item_id": third["id"]}
    cards = grid(page)
    assert [(c["id"], c["score"]) for c in cards] == api_hits(url, req)[0]
    assert third["id"] not in [c["id"] for c in cards] and len(cards) == 20
    assert page.get_attribute("#query-img", "alt").startswith("Query image: ")

    # 5. switch method, then open the λ strip: one row per λ, each equal to the API's
    page.select_option("#method", "average")
    req = shown_request(page, method="average", item_id=third["id"])
    assert [(c["id"], c["score"]) for c in grid(page)] == api_hits(url, req)[0]
    page.select_option("#method", "weicom")
    page.check("input[name=view][value=strip]")
    req = shown_request(page, method="weicom", lams=[0, 0.2, 0.4, 0.6, 0.8, 1])
    rows = page.eval_on_selector_all(".strip-row", "(rs) => rs.map((r) => Number(r.dataset.lam))")
    assert rows == [0, 0.2, 0.4, 0.6, 0.8, 1]
    want_rows = api_hits(url, req)
    for i, lam in enumerate(rows):
        got = grid(page, f".strip-row:nth-child({i + 1}) .hit")
        assert [(c["id"], c["score"]) for c in got] == want_rows[i], lam
    assert page.get_attribute(".strip-row.current", "data-lam") == "0.6"
    page.screenshot(path=str(artifacts_dir() / "serve-strip.png"), full_page=True)

    # 6. keyboard only: focus a result and press Enter to search from it
    page.check("input[name=view][value=grid]")
    req = shown_request(page, item_id=third["id"], lam=0.6)
    nxt = grid(page)[0]["id"]
    page.focus(f"#results .hit[data-id='{nxt}']")
    page.keyboard.press("Enter")
    req = shown_request(page, item_id=nxt)
    assert [(c["id"], c["score"]) for c in grid(page)] == api_hits(url, req)[0]


def test_accessibility_basics(page) -> None:
    unlabeled = page.evaluate("""() => [...document.querySelectorAll('input, select')]
        .filter((e) => e.type !== 'radio' && !(e.labels && e.labels.length))
        .map((e) => e.id)""")
    assert unlabeled == []
    radios_in_labels = page.evaluate("""() => [...document.querySelectorAll('input[type=radio]')]
        .every((e) => e.closest('label') && e.closest('fieldset').querySelector('legend'))""")
    assert radios_in_labels
    no_alt = page.evaluate("""() => [...document.querySelectorAll('#results img')]
        .filter((i) => !i.alt).length""")
    assert no_alt == 0
    assert page.get_attribute("html", "lang") == "en"
    assert page.get_attribute("#status", "role") == "status"


def test_errors_are_shown_not_thrown(page, served) -> None:
    bad = served["query"].with_name("not-an-image.png")
    bad.write_bytes(b"this is plain text, not a picture")
    page.set_input_files("#file", str(bad))
    page.wait_for_function("() => document.getElementById('results').dataset.state === 'error'")
    assert page.get_attribute("#status", "class") == "error"
    assert "not an image" in page.text_content("#status")


def test_drop_an_image_then_clear(page, served) -> None:
    url = served["url"]
    page.evaluate("""async () => {
      const blob = await (await fetch('/items/0/thumbnail?size=64')).blob();
      const dt = new DataTransfer();
      dt.items.add(new File([blob], 'dropped.jpg', {type: 'image/jpeg'}));
      document.getElementById('drop').dispatchEvent(
        new DragEvent('drop', {dataTransfer: dt, bubbles: true, cancelable: true}));
    }""")
    req = shown_request(page, method="weicom", k=24)
    assert "item_id" not in req and "image_token" not in req  # this search sent the file
    assert page.get_attribute("#query-img", "alt") == "Query image: uploaded file dropped.jpg"
    dropped = served["query"].with_name("dropped.jpg")
    dropped.write_bytes(httpx.get(url + "/items/0/thumbnail?size=64").content)
    assert [(c["id"], c["score"]) for c in grid(page)] == api_hits(url, req, upload=dropped)[0]
    page.click("#clear-query")
    page.fill("#text", "")
    page.wait_for_function("() => document.getElementById('results').dataset.view === 'browse'")
    assert page.is_hidden("#query-img")


# ----------------------------------------------------------------------------- controls
def url_state(page) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(page.url).query).items()}


def test_lam_control_disabled_for_methods_it_does_not_affect(offline, served) -> None:
    pg = offline().page
    pg.goto(served["url"] + "/?item=2&text=a%20beach")
    shown_request(pg, item_id=2, method="weicom")
    assert pg.is_enabled("#lam") and pg.is_hidden("#lam-note")
    assert pg.is_enabled("input[name=view][value=strip]")
    for method in ("average", "sum", "product", "image", "text"):
        pg.select_option("#method", method)
        req = shown_request(pg, method=method, item_id=2)
        assert pg.is_disabled("#lam"), method
        assert pg.is_disabled("input[name=view][value=strip]"), method
        note = pg.text_content("#lam-note")
        assert pg.is_visible("#lam-note") and "only weighs the fused methods" in note and "ignores" in note
        assert "λ not used" in pg.text_content("#status")
        assert [(c["id"], c["score"]) for c in grid(pg)] == api_hits(served["url"], req)[0]
    # WeiCom without a text runs image-only: λ has nothing to weigh
    pg.select_option("#method", "weicom")
    pg.fill("#text", "")
    shown_request(pg, method="image", item_id=2)
    assert pg.is_disabled("#lam")
    assert "needs both a query image and a modifier text" in pg.text_content("#lam-note")
    pg.fill("#text", "boats")
    shown_request(pg, method="weicom", texts=["boats"])
    assert pg.is_enabled("#lam") and pg.is_hidden("#lam-note")
    # the method labels say what the methods compute
    labels = pg.eval_on_selector_all("#method option",
                                     "(os) => Object.fromEntries(os.map((o) => [o.value, o.text]))")
    assert labels["average"] == "Average of similarities"
    assert labels["sum"] == "Sum of similarities" and labels["product"] == "Product of similarities"
    assert pg.text_content("label[for=k]") == "Results per page"


def test_strip_includes_and_highlights_the_sliders_lam(offline, served) -> None:
    pg = offline().page
    pg.goto(served["url"] + "/?item=4&text=a%20harbor%20with%20boats&lam=0.35&view=strip")
    req = shown_request(pg, item_id=4, lams=[0, 0.2, 0.35, 0.4, 0.6, 0.8, 1])
    assert pg.eval_on_selector_all(".strip-row.current", "(rs) => rs.map((r) => r.dataset.lam)") \
        == ["0.35"]
    assert pg.get_attribute(".strip-row.current", "aria-current") == "true"
    want = api_hits(served["url"], req)
    got = grid(pg, ".strip-row.current .hit")
    assert [(c["id"], c["score"]) for c in got] == want[2]
    pg.screenshot(path=str(artifacts_dir() / "serve-strip-lam.png"), full_page=True)
    # one step right (0.05): 0.40 is one of the strip's own rows, now the highlighted one
    pg.focus("#lam")
    pg.keyboard.press("ArrowRight")
    shown_request(pg, item_id=4, lams=[0, 0.2, 0.4, 0.6, 0.8, 1])
    assert pg.eval_on_selector_all(".strip-row.current", "(rs) => rs.map((r) => r.dataset.lam)") \
        == ["0.4"]


def test_url_state_back_forward_and_sharing(offline, served) -> None:
    url = served["url"]
    pg = offline().page
    pg.goto(url + "/?item=3&text=a%20beach&lam=0.7")
    first = shown_request(pg, item_id=3, texts=["a beach"], lam=0.7, method="weicom")
    assert pg.input_value("#text") == "a beach" and pg.input_value("#lam") == "0.7"
    path3 = httpx.get(url + "/items/3").json()["path"]
    pg.wait_for_function("(p) => document.getElementById('query-caption').textContent"
                         ".includes(p)", arg=path3)
    grid_first = [(c["id"], c["score"]) for c in grid(pg)]
    assert grid_first == api_hits(url, first)[0]

    pg.select_option("#method", "sum")
    shown_request(pg, method="sum", item_id=3)
    assert url_state(pg) == {"item": "3", "text": "a beach", "lam": "0.7", "method": "sum"}
    other = grid(pg)[0]["id"]
    pg.click(f"#results .hit[data-id='{other}']")
    shown_request(pg, method="sum", item_id=other)
    assert url_state(pg)["item"] == str(other)

    pg.go_back()
    req = shown_request(pg, method="sum", item_id=3)
    assert [(c["id"], c["score"]) for c in grid(pg)] == api_hits(url, req)[0]
    assert pg.input_value("#method") == "sum"
    pg.go_back()
    shown_request(pg, method="weicom", item_id=3, lam=0.7)
    assert [(c["id"], c["score"]) for c in grid(pg)] == grid_first
    assert pg.input_value("#method") == "weicom"
    pg.go_forward()
    shown_request(pg, method="sum", item_id=3)

    # an upload is in the history too (by its token): back to it shows the file again
    pg.set_input_files("#file", str(served["query"]))
    req = shown_request(pg, method="sum")
    pg.wait_for_function("() => new URL(location).searchParams.has('upload')")
    token = url_state(pg)["upload"]
    assert "item" not in url_state(pg) and len(token) == 64
    pg.click(f"#results .hit[data-id='{other}']")
    shown_request(pg, method="sum", item_id=other)
    pg.go_back()
    req = shown_request(pg, method="sum", image_token=token)
    assert pg.text_content("#query-caption") == "Query: my query.png"
    assert [(c["id"], c["score"]) for c in grid(pg)] == \
        api_hits(url, {k: v for k, v in req.items() if k != "image_token"},
                 upload=served["query"])[0]
    pg.go_back()
    shown_request(pg, method="sum", item_id=3)

    # the URL is the whole state: a second browser tab shows the same results
    shared = pg.url
    pg2 = offline().page
    pg2.goto(shared)
    req2 = shown_request(pg2, method="sum", item_id=3)
    assert [(c["id"], c["score"]) for c in grid(pg2)] == api_hits(url, req2)[0]


def test_error_clears_stale_results(offline, served) -> None:
    pg = offline().page
    pg.goto(served["url"] + "/?item=1&text=forest")
    shown_request(pg, item_id=1)
    assert len(grid(pg)) == 20
    bad = served["query"].with_name("broken upload.png")
    bad.write_bytes(b"\x89PNG not really")
    pg.set_input_files("#file", str(bad))
    pg.wait_for_function("() => document.getElementById('results').dataset.state === 'error'")
    assert pg.eval_on_selector_all("#results .hit", "(hs) => hs.length") == 0
    assert pg.is_hidden("#pager")
    assert pg.get_attribute("#map", "data-hits") == "0"
    assert "Search failed" in pg.text_content("#status")
    # the preview falls back to the server, which says why it cannot show the file
    pg.wait_for_function("() => document.getElementById('query-img').dataset.preview === 'none'")
    assert "no preview" in pg.text_content("#query-caption")
    pg.screenshot(path=str(artifacts_dir() / "serve-error.png"))
    # a working query afterwards: results again, the error gone
    pg.set_input_files("#file", str(served["query"]))
    shown_request(pg, method="weicom", texts=["forest"])
    assert len(grid(pg)) == 21 and pg.get_attribute("#status", "class") != "error"


def _pixel(pg, x: int, y: int) -> list[int]:
    return pg.evaluate("""([x, y]) => {
      const img = document.getElementById('query-img');
      const c = document.createElement('canvas');
      c.width = img.naturalWidth; c.height = img.naturalHeight;
      const g = c.getContext('2d');
      g.drawImage(img, 0, 0);
      return [...g.getImageData(x, y, 1, 1).data.slice(0, 3)];
    }""", [x, y])


@pytest.mark.parametrize("bands", ["rgb8", "nir16"])
def test_tiff_upload_shows_a_server_preview(offline, served, tmp_path, bands) -> None:
    """Chromium cannot show a TIFF: the page shows the PNG that POST /preview decodes the way
    search decodes uploads (a 4-band 16-bit GeoTIFF through the indexer's reader)."""
    from rscir.ingest.images import load_image

    url = served["url"]
    rng = np.random.default_rng(11)
    if bands == "rgb8":
        arr = rng.integers(0, 255, (3, 40, 40), dtype=np.uint8)
    else:
        arr = rng.integers(0, 4000, (4, 40, 40), dtype=np.uint16)
    tif = write_geotiff(tmp_path / f"scene {bands}.tif", arr, 10.5, 45.5)
    r = httpx.post(url + "/preview", files={"image": (tif.name, tif.read_bytes(), "image/tiff")})
    if r.status_code == 415 and bands == "nir16":
        pytest.skip("this server's upload decoder refuses 4-band 16-bit TIFFs (uploads rework)")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png", r.text
    want = np.asarray(load_image(tif)[0])

    pg = offline().page
    pg.goto(url + "/")
    pg.set_input_files("#file", str(tif))
    pg.wait_for_function("""() => { const i = document.getElementById('query-img');
        return i.dataset.preview === 'server' && i.complete && i.naturalWidth > 0; }""")
    assert pg.evaluate("() => document.getElementById('query-img').naturalWidth") == 40
    for x, y in [(0, 0), (5, 7), (39, 20)]:
        assert _pixel(pg, x, y) == want[y, x].tolist()
    assert pg.get_attribute("#query-img", "alt") == f"Query image: uploaded file {tif.name}"
    req = shown_request(pg, method="image")
    assert [(c["id"], c["score"]) for c in grid(pg)] == api_hits(url, req, upload=tif)[0]
    pg.screenshot(path=str(artifacts_dir() / f"serve-tiff-preview-{bands}.png"))


def test_docs_work_offline(offline, served) -> None:
    o = offline()
    o.page.goto(served["url"] + "/docs")
    o.page.wait_for_selector(".swagger-ui .opblock-summary-path[data-path='/search']")
    assert "rscir" in o.page.text_content(".swagger-ui .info .title")
    o.page.click(".opblock-summary-path[data-path='/preview']")
    o.page.wait_for_selector("text=for browsers that cannot show the file")
    o.page.screenshot(path=str(artifacts_dir() / "serve-docs.png"))
    # Offline.close (at teardown) asserts that nothing outside the loopback was requested and
    # that no request was blocked by the page's content security policy


# ----------------------------------------------------------------------------- map and paging
MAP_HITS = "(m) => Number(document.getElementById('map').dataset.hits)"


def on_map(pg, lat: float, lon: float) -> tuple[float, float]:
    """Viewport coordinates of a map position (inside the container's border)."""
    p = pg.evaluate("""([la, lo]) => { const el = rscirMap.getContainer();
        const r = el.getBoundingClientRect(); const p = rscirMap.latLngToContainerPoint([la, lo]);
        return [r.left + el.clientLeft + p.x, r.top + el.clientTop + p.y]; }""", [lat, lon])
    return p[0], p[1]


def at_map(pg, x: float, y: float) -> tuple[float, float]:
    """The (lon, lat) under viewport coordinates."""
    p = pg.evaluate("""([x, y]) => { const el = rscirMap.getContainer();
        const r = el.getBoundingClientRect();
        const q = rscirMap.containerPointToLatLng([x - r.left - el.clientLeft,
                                                   y - r.top - el.clientTop]);
        return [q.lng, q.lat]; }""", [x, y])
    return p[0], p[1]


def hit_positions(pg) -> dict[int, tuple[float, float]]:
    return {int(k): (v[0], v[1]) for k, v in pg.eval_on_selector_all(
        "#results .hit", "(hs) => hs.map((h) => [h.dataset.id, [Number(h.dataset.lon),"
        " Number(h.dataset.lat)]])")}


def test_browse_pages_through_the_whole_archive(offline, geo) -> None:
    url = geo["url"]
    pg = offline().page
    pg.goto(url + "/")
    pg.wait_for_function("() => document.getElementById('results').dataset.view === 'browse'")
    first = [c["id"] for c in grid(pg)]
    assert first == [it["id"] for it in httpx.get(url + "/items?limit=48").json()["items"]]
    assert "page 1 of 2" in pg.text_content("#page-info")
    # cards name the file and give its coordinates; the map shows the page's points
    names = pg.eval_on_selector_all("#results .hit .name", "(ns) => ns.map((n) => n.textContent)")
    assert names[0] == "farmland_tile_00.tif"
    assert pg.text_content("#results .hit .coords").endswith("°E")
    lon, lat = geo_position(0, 0)
    assert pg.text_content("#results .hit .coords") == f"{lat:.3f}°N {lon:.3f}°E"
    pg.wait_for_function(MAP_HITS + " === 48")
    pg.screenshot(path=str(artifacts_dir() / "serve-browse.png"), full_page=True)

    pg.click("#next")
    pg.wait_for_function("() => new URL(location).searchParams.get('browse') === '2'")
    pg.wait_for_function("() => document.querySelectorAll('#results .hit').length === 12")
    second = [c["id"] for c in grid(pg)]
    assert second == [it["id"] for it in
                      httpx.get(url + "/items?limit=48&offset=48").json()["items"]]
    assert sorted(first + second) == list(range(60))
    assert pg.is_disabled("#next") and "page 2 of 2" in pg.text_content("#page-info")
    pg.go_back()
    pg.wait_for_function("() => document.querySelectorAll('#results .hit').length === 48")
    assert [c["id"] for c in grid(pg)] == first


def test_map_shows_hits_linked_with_the_grid(offline, geo) -> None:
    url = geo["url"]
    pg = offline().page
    pg.goto(url + "/?item=7&text=a%20harbor&k=12")
    req = shown_request(pg, item_id=7, k=12)
    hits = grid(pg)
    assert [(c["id"], c["score"]) for c in hits] == api_hits(url, req)[0]
    pg.wait_for_function(MAP_HITS + " === 12")
    # the map is fit to the hits: every hit is inside the visible bounds
    bounds = pg.evaluate("() => { const b = rscirMap.getBounds(); "
                         "return [b.getWest(), b.getSouth(), b.getEast(), b.getNorth()]; }")
    pos = hit_positions(pg)
    assert all(bounds[0] <= lo <= bounds[2] and bounds[1] <= la <= bounds[3]
               for lo, la in pos.values())
    assert bounds[2] - bounds[0] < 5  # zoomed to them, not the world
    # markers are coloured by rank: the best is the darkest
    fills = pg.eval_on_selector_all("#map path.leaflet-interactive",
                                    "(ps) => ps.map((p) => p.getAttribute('fill'))")
    assert len(fills) == 12 and "rgb(13, 8, 135)" in fills
    # hover a card: its marker is highlighted (thick outline)
    best = hits[0]["id"]
    pg.hover(f"#results .hit[data-id='{best}']")
    widths = pg.eval_on_selector_all("#map path.leaflet-interactive",
                                     "(ps) => ps.map((p) => p.getAttribute('stroke-width'))")
    assert widths.count("4") == 1
    # hover a marker: its card is highlighted; the tooltip names the file
    pg.mouse.move(0, 0)
    lon, lat = pos[best]
    pg.mouse.move(*on_map(pg, lat, lon))
    pg.wait_for_selector(f"#results .hit.linked[data-id='{best}']")
    assert pg.text_content(".leaflet-tooltip").startswith("#1 ")
    pg.screenshot(path=str(artifacts_dir() / "serve-map-hits.png"), full_page=True)


def test_draw_an_area_on_the_map(offline, geo) -> None:
    url = geo["url"]
    pg = offline().page
    pg.goto(url + "/?item=7&text=a%20harbor&k=48")
    req = shown_request(pg, item_id=7, k=48)
    everywhere = api_hits(url, req)[0]
    pg.wait_for_function(MAP_HITS + " === 48")
    # drag a rectangle over the western half of the tiles
    a, b = (tuple(map(round, on_map(pg, *ll))) for ll in [(45.72, 9.95), (44.95, 10.45)])
    (w, n), (e, s) = at_map(pg, *a), at_map(pg, *b)
    want = [w, s, e, n]
    pg.click("#draw-area")
    assert pg.get_attribute("#draw-area", "aria-pressed") == "true"
    pg.mouse.move(*a)
    pg.mouse.down()
    pg.mouse.move((a[0] + b[0]) / 2, (a[1] + b[1]) / 2, steps=3)
    pg.mouse.move(*b, steps=3)
    pg.mouse.up()
    pg.wait_for_function("() => JSON.parse(document.getElementById('results').dataset.request"
                         " || '{}').filter?.bbox")
    req = json.loads(pg.get_attribute("#results", "data-request"))
    pg.wait_for_function(WAIT_FOR, arg={"filter": req["filter"]})
    bbox = req["filter"]["bbox"]
    assert bbox == pytest.approx(want, abs=2e-5)
    assert bbox == pytest.approx([9.95, 44.95, 10.45, 45.72], abs=0.02)
    hits = grid(pg)
    assert [(c["id"], c["score"]) for c in hits] == api_hits(url, req)[0]
    inside = hit_positions(pg)
    # every hit's footprint intersects the drawn area (its centre may lie just outside)
    from shapely.geometry import box, shape

    area = box(*bbox)
    served = httpx.post(url + "/search", json=req, timeout=30).json()["results"][0]["hits"]
    assert served and all(area.intersects(shape(h["footprint"])) for h in served)
    assert set(inside) == {h["id"] for h in served}
    assert len(inside) < len(everywhere)  # the area excluded some hits
    assert url_state(pg)["bbox"] == ",".join(str(x) for x in bbox)
    assert "Area:" in pg.text_content("#area-info")
    pg.wait_for_function(MAP_HITS + f" === {len(hits)}")
    pg.screenshot(path=str(artifacts_dir() / "serve-map-area.png"), full_page=True)
    # clear the area: all hits again
    pg.click("#clear-area")
    req = shown_request(pg, item_id=7, k=48)
    assert "filter" not in req and len(grid(pg)) == 48


def _has(url: str, field: str, model: str = "SearchRequest") -> bool:
    schemas = httpx.get(url + "/openapi.json").json()["components"]["schemas"]
    return field in schemas.get(model, {}).get("properties", {})


def test_planned_fields_paging_similarities_and_footprints(offline, geo) -> None:
    """Hits' footprints and image/text similarities, and paging with ``offset``: where this
    server lacks them, /search answers are extended here from its own results (similarities
    rank-derived, footprints boxes around the points, offset sliced from a longer top-k)."""
    url = geo["url"]
    has_offset = _has(url, "offset")
    o = offline()
    pg = o.page

    def search(route) -> None:
        body = json.loads(route.request.post_data or "{}")
        off = 0 if has_offset else body.pop("offset", 0)
        body["k"] = body.get("k", 20) + off
        r = httpx.post(url + "/search", json=body, timeout=30)
        res = r.json()
        for lr in res.get("results", []):
            hits = lr["hits"][off:]
            for i, h in enumerate(hits):
                if not has_offset:  # this server ranks from offset + 1 itself
                    h["rank"] = off + i + 1
                if "sim_image" not in h:
                    h["sim_image"], h["sim_text"] = 0.5 - 0.01 * h["rank"], 0.25
                if h.get("footprint") is None:
                    d = 0.02
                    h["footprint"] = {"type": "Polygon", "coordinates": [[
                        [h["lon"] - d, h["lat"] - d], [h["lon"] + d, h["lat"] - d],
                        [h["lon"] + d, h["lat"] + d], [h["lon"] - d, h["lat"] + d],
                        [h["lon"] - d, h["lat"] - d]]]}
            lr["hits"] = hits
        route.fulfill(status=r.status_code, json=res)

    def openapi(route) -> None:
        spec = httpx.get(url + "/openapi.json").json()
        spec["components"]["schemas"]["SearchRequest"]["properties"].setdefault(
            "offset", {"type": "integer"})
        route.fulfill(json=spec)

    pg.route("**/search", search)
    pg.route("**/openapi.json", openapi)
    pg.goto(url + "/?item=7&text=a%20harbor&k=12")
    req = shown_request(pg, item_id=7, k=12)
    top24 = [i for i, _ in api_hits(url, {**req, "k": 24})[0]]
    assert [c["id"] for c in grid(pg)] == top24[:12]
    assert pg.is_enabled("#next")
    pg.hover("#results .hit >> nth=0")
    sims = pg.text_content("#results .hit .sims")
    assert pg.is_visible("#results .hit .sims") and sims.startswith("img ") and "txt " in sims
    assert "image similarity" in grid(pg)[0]["title"]
    # footprints are drawn as polygons (four corners each), not points
    pg.wait_for_function(MAP_HITS + " === 12")
    ds = pg.eval_on_selector_all("#map path.leaflet-interactive",
                                 "(ps) => ps.map((p) => p.getAttribute('d'))")
    assert len(ds) == 12 and all(d.count("L") == 3 and d.endswith("z") for d in ds)
    pg.screenshot(path=str(artifacts_dir() / "serve-map-footprints.png"), full_page=True)

    pg.click("#next")
    req = shown_request(pg, item_id=7, k=12, offset=12)
    cards = grid(pg)
    assert [c["id"] for c in cards] == top24[12:]
    assert [c["rank"] for c in cards] == list(range(13, 25))
    assert url_state(pg)["page"] == "2" and "results 13–24" in pg.text_content("#status")
    pg.go_back()
    shown_request(pg, item_id=7, k=12)
    assert [c["id"] for c in grid(pg)] == top24[:12]


def test_dates_and_downloads_follow_the_server(offline, geo, tmp_path) -> None:
    """Date inputs and the download button are live only where the server's API has them."""
    url = geo["url"]
    pg = offline().page
    pg.goto(url + "/?item=7&text=a%20harbor&k=12")
    req = shown_request(pg, item_id=7, k=12)
    if _has(url, "start", "FilterSpec"):
        pg.fill("#start", "2020-01-01")
        pg.dispatch_event("#start", "change")
        req = shown_request(pg, item_id=7, filter={"start": "2020-01-01"})
    else:
        assert pg.is_disabled("#start") and pg.is_disabled("#end")
        assert "cannot filter by date" in pg.text_content("#date-note")
    if _has(url, "format"):
        with pg.expect_download() as dl:
            pg.click("#download")
        path = tmp_path / "results.geojson"
        dl.value.save_as(path)
        fc = json.loads(path.read_text())
        assert [f["properties"]["id"] for f in fc["features"]] == \
            [i for i, _ in api_hits(url, req)[0]]
    else:
        assert pg.is_disabled("#download")
        assert "cannot export" in pg.text_content("#dl-note")


@pytest.mark.parametrize("tiles", ["served", "missing"])
def test_basemap_and_coverage_from_info(offline, geo, tiles) -> None:
    """/info's ``basemap`` template and ``coverage`` outline (added here where this server lacks
    them): tiles that load replace the graticule; tiles that fail leave it drawn."""
    url = geo["url"]
    template = ("/items/0/thumbnail?size=256&z={z}&x={x}&y={y}" if tiles == "served"
                else "/no-such-tiles/{z}/{x}/{y}.png")
    coverage = {"type": "Polygon", "coordinates": [[[9.9, 44.9], [11.1, 44.9], [11.1, 45.8],
                                                    [9.9, 45.8], [9.9, 44.9]]]}
    o = offline()
    pg = o.page

    def info(route) -> None:
        body = httpx.get(url + "/info").json()
        if not body.get("basemap"):  # this server was started without --basemap
            body["basemap"] = template
        if not body.get("coverage"):
            body["coverage"] = coverage
        route.fulfill(json=body)

    pg.route("**/info", info)
    pg.goto(url + "/")
    pg.wait_for_function("() => document.getElementById('results').dataset.view === 'browse'")
    pg.wait_for_function("() => document.getElementById('map-legend').textContent"
                         ".includes('dashed: archive coverage')")
    if tiles == "served":
        pg.wait_for_function("() => document.querySelectorAll('#map .leaflet-tile-loaded')"
                             ".length > 0 && !document.querySelector('#map .grat-label')")
        assert "no basemap" not in pg.text_content("#map-legend")
    else:
        pg.wait_for_function("() => document.querySelectorAll('#map .grat-label').length > 0")
        pg.wait_for_timeout(500)  # the failed tiles have come back by now
        assert pg.eval_on_selector_all("#map .leaflet-tile-loaded", "(ts) => ts.length") == 0
        assert pg.eval_on_selector_all("#map .grat-label", "(ls) => ls.length") > 0
        assert "basemap unreachable: lon/lat grid" in pg.text_content("#map-legend")
    # the outline is the one /info gave (dashed), not one the page computed
    dashed = pg.eval_on_selector_all("#map path[stroke-dasharray='5 4']", "(ps) => ps.length")
    assert dashed == 1
    pg.screenshot(path=str(artifacts_dir() / f"serve-basemap-{tiles}.png"))
