"""A cold ``rscir`` imports only what the command needs, the text cache gives the same results
as the text tower, and ``rscir serve`` has its models loaded before it answers anything."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import pytest
from conftest import REPO, make_image_folder

from rscir.cli import main

HEAVY = ("torch", "torchvision", "transformers", "sentence_transformers", "open_clip", "faiss",
         "skimage", "sklearn", "fastapi", "uvicorn", "ray", "psycopg", "matplotlib")

PROBE = """
import json, sys
from rscir.cli import main
try:
    rc = main(sys.argv[1:])
except SystemExit as e:
    rc = e.code
heavy = {heavy!r}
print(json.dumps({{"rc": rc, "loaded": [m for m in heavy if m in sys.modules]}}), file=sys.stderr)
"""


def probe(*argv: str, cache: Path) -> tuple[int, list[str], str]:
    """Run ``rscir ARGV`` in a new interpreter: exit status, heavy modules loaded, stdout."""
    env = {**os.environ, "RSCIR_CACHE": str(cache)}
    p = subprocess.run([sys.executable, "-c", PROBE.format(heavy=HEAVY), *argv], cwd=REPO,
                       env=env, capture_output=True, text=True, timeout=600)
    d = json.loads(p.stderr.strip().splitlines()[-1])
    return d["rc"], d["loaded"], p.stdout


@pytest.fixture(scope="module")
def mini_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cold")
    folder = make_image_folder(root / "images", {"beach": 4, "harbor": 4, "forest": 4})
    rc = main(["index", str(folder), "--store", str(root / "s"), "--model", "rscir-mini",
               "--no-progress", "--workers", "0", "--device", "cpu"])
    assert rc == 0
    return root / "s"


def test_help_loads_nothing_heavy(tmp_path: Path) -> None:
    rc, loaded, out = probe("--help", cache=tmp_path)
    assert rc == 0 and "search" in out and loaded == []


def test_text_search_loads_no_torch(mini_store: Path, tmp_path: Path) -> None:
    """An archive item plus a text: stored image embedding, numpy text tower. Cold (empty
    cache) and cached runs print identical results."""
    args = ("search", str(mini_store), "--item-id", "2", "--text", "with boats", "-k", "5",
            "--json")
    rc, loaded, cold = probe(*args, cache=tmp_path)
    assert rc == 0 and loaded == []
    assert (tmp_path / "text-embeddings.sqlite").is_file()
    rc, loaded, cached = probe(*args, cache=tmp_path)
    assert rc == 0 and loaded == [] and cached == cold
    hits = json.loads(cold)["results"][0]["hits"]
    assert len(hits) == 5 and 2 not in [h["id"] for h in hits]


def test_image_searches_load_no_torch(mini_store: Path, tmp_path: Path) -> None:
    """An archive image: its stored embedding. An image from elsewhere: the default model's
    descriptor tower, in numpy."""
    archive = mini_store.parent / "images" / "beach" / "beach01.jpg"
    outside = tmp_path / "q.jpg"
    outside.write_bytes(archive.read_bytes())
    common = ("--method", "image", "-k", "3", "--json")
    rc, loaded, a = probe("search", str(mini_store), "--image", str(archive), *common,
                          cache=tmp_path)
    assert rc == 0 and loaded == []
    rc, loaded, b = probe("search", str(mini_store), "--image", str(outside), *common,
                          cache=tmp_path)
    assert rc == 0 and loaded == ["skimage"]
    # the same pixels embedded afresh: the archive copy comes first, with cosine ~1
    item = json.loads(a)["query"]["item_id"]
    first = json.loads(b)["results"][0]["hits"][0]
    assert item is not None and first["id"] == item and first["score"] > 0.999


def test_serve_warms_the_model_before_answering(mini_store: Path,
                                                monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """When the server starts serving (the first moment /healthz can answer), both towers are
    loaded; and the page's first text search answers."""
    pytest.importorskip("fastapi")
    import rscir.serve.server as server_mod

    seen: dict[str, object] = {}
    real = server_mod.make_server

    def spy(app, sock, **kw):
        enc = app.state.api.searcher.encoder
        seen["tower"] = enc._mlp is not None  # the default model's descriptor tower (numpy)
        seen["text"] = enc.text._model is not None
        srv = real(app, sock, **kw)
        url = server_mod.url_of(sock)

        def client() -> None:
            while not srv.started:
                threading.Event().wait(0.02)
            with urllib.request.urlopen(url + "/healthz", timeout=60) as r:
                seen["health"] = json.loads(r.read())
            body = json.dumps({"item_id": 1, "texts": ["with boats"], "k": 3}).encode()
            req = urllib.request.Request(url + "/search", data=body,
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=60) as r:
                seen["search"] = json.loads(r.read())
            srv.should_exit = True

        threading.Thread(target=client, daemon=True).start()
        return srv

    monkeypatch.setattr(server_mod, "make_server", spy)
    rc = main(["serve", str(mini_store), "--port", "0", "--device", "cpu"])
    assert rc == 0
    assert seen["tower"] is True and seen["text"] is True
    assert seen["health"] == {"status": "ok"}
    assert len(seen["search"]["results"][0]["hits"]) == 3
    assert "rscir serve: http://127.0.0.1:" in capsys.readouterr().err
