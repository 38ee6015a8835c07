"""The web page, driven in headless Chromium (Debian's ``chromium`` via Playwright) against a real
uvicorn server on a free loopback port: what the page shows must be what the API returns.

Screenshots go to ``$RSCIR_TEST_ARTIFACTS`` (default ``out/test-artifacts/``, git-ignored)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

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


@pytest.fixture(scope="module")
def page(served):
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        pg = browser.new_page(viewport={"width": 1280, "height": 900})
        errors: list[str] = []
        pg.on("pageerror", lambda e: errors.append(str(e)))
        pg.set_default_timeout(20_000)
        pg.goto(served["url"] + "/")
        yield pg
        browser.close()
        assert not errors, errors


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
