"""The persistent text-embedding cache: exact round trips, per-model keys, a size bound, several
processes at once, and an unusable file never failing an encode."""

from __future__ import annotations

import inspect
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO

from rscir.encoders.base import ModelInfo
from rscir.encoders.text_cache import FILE_NAME, TextEmbeddingCache

DIM = 8


def fake_embed(texts: list[str]) -> np.ndarray:
    """Deterministic per text (seeded by its bytes), so any process computes the same rows."""
    rows = [np.random.default_rng(list(t.encode()) or [0]).standard_normal(DIM) for t in texts]
    out = np.asarray(rows, np.float32).reshape(len(texts), DIM)
    return out / np.linalg.norm(out, axis=1, keepdims=True)


class Counting:
    def __init__(self) -> None:
        self.seen: list[list[str]] = []

    def __call__(self, texts: list[str]) -> np.ndarray:
        self.seen.append(list(texts))
        return fake_embed(texts)


def test_round_trip_embeds_each_text_once(tmp_path: Path) -> None:
    c = TextEmbeddingCache(tmp_path / FILE_NAME, "m", DIM)
    emb = Counting()
    texts = ["with boats", "denser", "with boats", "Ünï 東京", ""]
    a = c.encode(texts, emb)
    assert emb.seen == [["with boats", "denser", "Ünï 東京", ""]]  # misses only, each once
    np.testing.assert_array_equal(a, fake_embed(texts))
    b = c.encode(list(reversed(texts)), emb)
    assert len(emb.seen) == 1  # all cached
    np.testing.assert_array_equal(b, a[::-1])  # bit-exact, in the order asked
    c.encode(["denser", "new"], emb)
    assert emb.seen[-1] == ["new"]
    assert c.encode([], emb).shape == (0, DIM)


def test_models_do_not_share_entries(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    info = ModelInfo(name="m", arch="a", fingerprint="sha256:1", dim=DIM, backend="b")
    other = ModelInfo(name="m", arch="a", fingerprint="sha256:2", dim=DIM, backend="b")
    path = tmp_path / "c"
    monkeypatch.setenv("RSCIR_CACHE", str(path))
    c1, c2 = TextEmbeddingCache.for_model(info), TextEmbeddingCache.for_model(other)
    c3 = TextEmbeddingCache.for_model(info, variant="cuda:fp16")
    assert c1 is not None and c2 is not None and c3 is not None
    assert c1.path == c2.path == path / FILE_NAME
    assert len({c1.model, c2.model, c3.model}) == 3
    c1.store(["t"], np.ones((1, DIM), np.float32))
    assert "t" in c1.lookup(["t"]) and c2.lookup(["t"]) == {} and c3.lookup(["t"]) == {}


def test_turned_off_by_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    info = ModelInfo(name="m", arch="a", fingerprint="f", dim=DIM)
    monkeypatch.setenv("RSCIR_TEXT_CACHE", "0")
    assert TextEmbeddingCache.for_model(info) is None


def test_size_is_bounded_least_recently_used_first(tmp_path: Path) -> None:
    c = TextEmbeddingCache(tmp_path / FILE_NAME, "m", DIM, max_entries=10)
    c.encode([f"old{i}" for i in range(8)], fake_embed)
    c.lookup(["old0", "old1"])  # used again: survive
    c.encode([f"new{i}" for i in range(5)], fake_embed)  # 13 > 10: trim to 9
    with sqlite3.connect(tmp_path / FILE_NAME) as con:
        kept = {t for (t,) in con.execute("SELECT text FROM emb")}
    assert len(kept) == 9
    assert {"old0", "old1"} | {f"new{i}" for i in range(5)} <= kept
    assert len(kept & {f"old{i}" for i in range(2, 8)}) == 2  # the four oldest went


def test_concurrent_processes(tmp_path: Path) -> None:
    """Four processes write and read the same file at once; nothing is lost or mixed up."""
    code = f"import sys\nimport numpy as np\nDIM = {DIM}\n" + inspect.getsource(fake_embed) + (
        "from rscir.encoders.text_cache import TextEmbeddingCache\n"
        "c = TextEmbeddingCache(sys.argv[1], 'm', 8, max_entries=100000)\n"
        "w = int(sys.argv[2])\n"
        "for r in range(20):\n"
        "    texts = [f'w{w}-{r}-{i}' for i in range(10)] + [f'shared-{i}' for i in range(10)]\n"
        "    out = c.encode(texts, fake_embed)\n"
        "    assert np.array_equal(out, fake_embed(texts)), r\n"
        "assert not c.broken\n"
    )
    path = tmp_path / FILE_NAME
    procs = [subprocess.Popen([sys.executable, "-c", code, str(path), str(w)], cwd=REPO,
                              stderr=subprocess.PIPE, text=True) for w in range(4)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    with sqlite3.connect(path) as con:
        (n,) = con.execute("SELECT COUNT(*) FROM emb").fetchone()
    assert n == 4 * 20 * 10 + 10


def test_unusable_file_never_fails_an_encode(tmp_path: Path) -> None:
    bad = tmp_path / FILE_NAME
    bad.write_bytes(b"this is not a database" * 100)
    c = TextEmbeddingCache(bad, "m", DIM)
    emb = Counting()
    np.testing.assert_array_equal(c.encode(["a", "b"], emb), fake_embed(["a", "b"]))
    assert c.broken and bad.read_bytes().startswith(b"this is not")  # left alone
    c.encode(["a"], emb)
    assert len(emb.seen) == 2  # no cache: embedded again
    # a folder that cannot be created
    (tmp_path / "file").write_text("x")
    c2 = TextEmbeddingCache(tmp_path / "file" / "sub" / FILE_NAME, "m", DIM)
    np.testing.assert_array_equal(c2.encode(["a"], fake_embed), fake_embed(["a"]))
    assert c2.broken


def test_mini_encoder_uses_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from rscir.encoders import load_encoder

    monkeypatch.setenv("RSCIR_CACHE", str(tmp_path))
    enc = load_encoder("rscir-mini", device="cpu")
    assert enc.text_cache is not None and enc.text_cache.path == tmp_path / FILE_NAME
    first = enc.encode_texts(["with boats", "denser"])
    again = load_encoder("rscir-mini", device="cpu")  # a new process would see the same file
    calls: list[list[str]] = []
    real = again.text.encode
    monkeypatch.setattr(again.text, "encode", lambda t: calls.append(list(t)) or real(t))
    np.testing.assert_array_equal(again.encode_texts(["denser", "with boats"]), first[::-1])
    assert calls == []  # the text tower did not run
    again.encode_texts(["a pool"])
    assert calls == [["a pool"]]
