"""A store never loses data and always says what is wrong (the audit's cases, reproduced).

Every case checks the promise directly: the store's file listing is the same before and after a
refused command (or what was set aside sits in ``quarantine/`` with a note), and the user sees
one line naming the fix, never a traceback.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from rscir.cli import main
from rscir.encoders.base import ModelInfo, l2_normalize
from rscir.errors import StoreDamagedError, StoreError, StoreLockedError
from rscir.moments import Moments
from rscir.search import Searcher
from rscir.stores import DirectoryStore, open_or_create_store

DIM = 8
INFO = ModelInfo(name="m", arch="A", fingerprint="sha256:aa", dim=DIM)
INFO2 = ModelInfo(name="m2", arch="B", fingerprint="sha256:bb", dim=DIM)


def vecs(n: int, seed: int = 0) -> np.ndarray:
    return l2_normalize(np.random.default_rng(seed).normal(size=(n, DIM))).astype(np.float32)


def items(lo: int, hi: int) -> list[dict]:
    return [{"path": f"c{i % 3}/{i:04d}.jpg", "label": f"c{i % 3}", "size": 1, "mtime_ns": 1}
            for i in range(lo, hi)]


def build(path: Path, segments: int = 4, per: int = 25, compact: bool = False) -> DirectoryStore:
    st = DirectoryStore.create(path, INFO, path.parent)
    for s in range(segments):
        st.add(vecs(per, s), items(s * per, (s + 1) * per))
    if compact:
        st.compact()
    st.close()
    return DirectoryStore.open(path)


def listing(path: Path) -> dict[str, bytes]:
    """Every file under the store (except the lock) with its bytes."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file() and p.name != ".lock"}


def state(path: Path) -> dict:
    return json.loads((path / "state.json").read_text())


def write_state(path: Path, obj: object) -> None:
    (path / "state.json").write_text(json.dumps(obj))


def one_line_error(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    rc = main(list(args))
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


# ------------------------------------------------------------------ nothing deleted on doubt
def test_missing_manifest_is_an_error_never_a_new_store(tmp_path: Path, image_folder: Path,
                                                        capsys) -> None:
    s = tmp_path / "s"
    build(s)
    (s / "manifest.json").unlink()
    before = listing(s)
    for cmd in (["index", str(image_folder), "--store", str(s), "--model", "rscir-tiny",
                 "--no-progress", "--workers", "0"], ["info", str(s)],
                ["search", str(s), "--item-id", "1", "--text", "x"]):
        err = one_line_error(capsys, *cmd)
        assert "manifest.json" in err and "rscir verify" in err and "rscir repair" in err
    assert listing(s) == before
    with pytest.raises(StoreDamagedError):
        open_or_create_store(s, INFO, tmp_path)
    assert listing(s) == before


@pytest.mark.parametrize("bad_state", [{"segments": [], "next_id": 100, "generation": 4},
                                       {"segments": "seg", "next_id": 100, "generation": 4},
                                       [], {"next_id": 1, "generation": 1}, "garbage{"])
def test_damaged_state_stops_every_command_and_deletes_nothing(tmp_path: Path, bad_state,
                                                               image_folder: Path,
                                                               capsys) -> None:
    s = tmp_path / "s"
    build(s)
    if isinstance(bad_state, str):
        (s / "state.json").write_text(bad_state)
    else:
        write_state(s, bad_state)
    before = listing(s)
    for cmd in (["info", str(s)], ["index", str(image_folder), "--store", str(s),
                                   "--no-progress", "--workers", "0", "--model", "rscir-tiny"]):
        err = one_line_error(capsys, *cmd)
        assert "rscir verify" in err and "rscir repair" in err, err
    assert listing(s) == before  # all 4 segment folders are still there, untouched
    assert len(list((s / "segments").iterdir())) == 4


def test_uncommitted_segments_go_to_quarantine_with_a_note(tmp_path: Path) -> None:
    s = tmp_path / "s"
    build(s, segments=2)
    gen = state(s)["generation"]
    orphan = s / "segments" / f"seg-{gen + 1:06d}-abc123"  # written, never committed
    shutil.copytree(s / "segments" / state(s)["segments"][0]["name"], orphan)
    partial = s / "segments" / ".tmp-0123abcd"  # a writer stopped mid-write
    partial.mkdir()
    (partial / "embeddings.npy").write_bytes(b"half")
    assert len(DirectoryStore.open(s)) == 50  # readers ignore both
    DirectoryStore.open(s, writable=True).close()
    assert not orphan.exists() and not partial.exists()
    notes = sorted((s / "quarantine").glob("*.note.json"))
    assert len(notes) == 2
    whys = " ".join(json.loads(n.read_text())["why"] for n in notes)
    assert "never committed" in whys and "newer than the committed state" in whys
    kept = [p for p in (s / "quarantine").iterdir() if p.is_dir()]
    assert sorted(p.name.split("-", 3)[-1] for p in kept) == sorted(
        [orphan.name, partial.name.lstrip(".")])
    assert (kept[0] / "embeddings.npy").exists()  # the bytes are all there
    rep = main(["repair", str(s), "--purge"])
    assert rep == 0 and not any((s / "quarantine").iterdir())


# ------------------------------------------------------------------ damage: one line each
def _seg(s: Path, i: int = 0) -> Path:
    return s / "segments" / state(s)["segments"][i]["name"]


DAMAGE: dict[str, Callable[[Path], None]] = {
    "empty embeddings": lambda s: (_seg(s) / "embeddings.npy").write_bytes(b""),
    "state is a list": lambda s: write_state(s, []),
    "half-written moments": lambda s: (_seg(s) / "moments.npz").write_bytes(
        (_seg(s) / "moments.npz").read_bytes()[:300]),
    "embeddings 10 rows short": lambda s: np.save(
        _seg(s) / "embeddings.npy", np.load(_seg(s) / "embeddings.npy")[:-10]),
    "state without segments": lambda s: write_state(
        s, {k: v for k, v in state(s).items() if k != "segments"}),
    "items unreadable": lambda s: (_seg(s) / "items.parquet").write_bytes(b"PAR1junk"),
    "segment folder gone": lambda s: shutil.rmtree(_seg(s, 1)),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_damage_is_one_clear_line(tmp_path: Path, case: str, capsys) -> None:
    s = tmp_path / "s"
    build(s, segments=3)
    DAMAGE[case](s)
    before = listing(s)
    err = one_line_error(capsys, "info", str(s))
    assert "rscir verify" in err, err
    assert listing(s) == before
    assert main(["verify", str(s)]) == 1
    out = capsys.readouterr().out
    assert "problem" in out and "Traceback" not in out


# ------------------------------------------------------------------ verify: checksums
def _flip_bit(s: Path) -> None:
    f = _seg(s) / "embeddings.npy"
    b = bytearray(f.read_bytes())
    b[-7] ^= 0x10
    f.write_bytes(bytes(b))


def _permute_rows(s: Path) -> None:
    f = _seg(s) / "embeddings.npy"
    x = np.load(f)
    np.save(f, x[::-1].copy())


def _swap_moments(s: Path) -> None:
    a, b = _seg(s, 0) / "moments.npz", _seg(s, 1) / "moments.npz"
    da, db = a.read_bytes(), b.read_bytes()
    a.write_bytes(db)
    b.write_bytes(da)


def _nan_row(s: Path) -> None:
    f = _seg(s) / "embeddings.npy"
    x = np.load(f)
    x[3] = np.nan
    np.save(f, x)


@pytest.mark.parametrize("tamper", [_flip_bit, _permute_rows, _swap_moments, _nan_row])
def test_verify_catches_what_opening_cannot_see(tmp_path: Path, tamper, capsys) -> None:
    s = tmp_path / "s"
    build(s, segments=3)
    assert main(["verify", str(s)]) == 0
    assert "ok" in capsys.readouterr().out
    tamper(s)
    assert main(["verify", str(s), "--json"]) == 1
    rep = json.loads(capsys.readouterr().out)
    assert not rep["ok"] and rep["problems"]
    assert all(p["where"].startswith("segments/seg-") for p in rep["problems"])
    assert any("repair" in p["fix"] for p in rep["problems"])


def test_repair_recomputes_moments_rebuilds_state_and_quarantines_damage(
        tmp_path: Path, capsys) -> None:
    s = tmp_path / "s"
    build(s, segments=3)
    ref = DirectoryStore.open(s)
    want_moments, want_items = ref.moments(), ref.items.copy()
    _swap_moments(s)
    assert main(["repair", str(s)]) == 0
    assert "recomputed moments" in capsys.readouterr().out
    assert main(["verify", str(s)]) == 0
    m = DirectoryStore.open(s).moments()
    np.testing.assert_allclose(m.sumsq, want_moments.sumsq, atol=1e-9)
    # a lost state is rebuilt from the intact segments
    (s / "state.json").unlink()
    assert main(["repair", str(s)]) == 0
    capsys.readouterr()
    st = DirectoryStore.open(s)
    assert st.items["path"].tolist() == want_items["path"].tolist()
    assert st.ids.tolist() == want_items["id"].tolist()
    # a lost manifest comes back from the state's copy
    (s / "manifest.json").unlink()
    assert main(["repair", str(s)]) == 0 and "restored manifest" in capsys.readouterr().out
    # a segment with flipped bits goes to quarantine; the rest stays searchable
    _flip_bit(s)
    assert main(["repair", str(s)]) == 0
    assert "quarantined" in capsys.readouterr().out
    st = DirectoryStore.open(s)
    assert len(st) == 50 and main(["verify", str(s)]) == 0
    assert any((s / "quarantine").glob("*seg-*"))
    Searcher(st, None).search_vectors(vecs(1), vecs(1, 9), "weicom", 0.5, 5)


# ------------------------------------------------------------------ concurrency
def _create_and_add(path: str, which: int, barrier: object, out: object) -> None:
    info = INFO if which % 2 == 0 else INFO2
    try:
        barrier.wait()  # type: ignore[attr-defined]
        st = open_or_create_store(path, info, os.path.dirname(path))
        st.add(vecs(5, which), items(100 * which, 100 * which + 5))
        st.close()
        out.put((which, "ok", ""))  # type: ignore[attr-defined]
    except StoreError as e:
        out.put((which, type(e).__name__, str(e)))  # type: ignore[attr-defined]
    except Exception as e:  # noqa: BLE001 - any other error is the defect under test
        out.put((which, "RAW " + type(e).__name__, str(e)))  # type: ignore[attr-defined]


def test_creation_race_ends_in_one_consistent_store(tmp_path: Path) -> None:
    ctx = mp.get_context("fork")
    for trial in range(12):
        path = str(tmp_path / f"race{trial}" / "store")
        os.makedirs(os.path.dirname(path))
        barrier, out = ctx.Barrier(2), ctx.Queue()
        procs = [ctx.Process(target=_create_and_add, args=(path, w + 2 * trial, barrier, out))
                 for w in range(2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
        res = sorted(out.get(timeout=5) for _ in procs)
        kinds = [r[1] for r in res]
        assert not any(k.startswith("RAW") for k in kinds), res
        assert "ok" in kinds, res
        for _, kind, msg in res:
            if kind != "ok":  # the loser is told, in one line, and wrote nothing
                assert kind in ("StoreLockedError", "ModelMismatchError"), res
                assert "another process" in msg or "built with model" in msg, msg
        st = DirectoryStore.open(path)
        winner = st.manifest.model
        assert len(st) == 5 * kinds.count("ok")
        assert all(st.manifest.model == winner for _ in [0])
        # every stored row was written by a writer of the manifest's model
        assert DirectoryStore.verify_at(path).ok


def _writer_loop(path: str, rounds: int) -> None:
    st = DirectoryStore.open(path, writable=True)
    for r in range(rounds):
        st.add(vecs(20, 100 + r), items(1000 + 20 * r, 1020 + 20 * r))
        st.compact()
    st.close()


def test_readers_during_compaction_never_fail(tmp_path: Path) -> None:
    s = tmp_path / "s"
    build(s, segments=2)
    ctx = mp.get_context("fork")
    w = ctx.Process(target=_writer_loop, args=(str(s), 25))
    w.start()
    opens = failures = 0
    errors: list[str] = []
    while w.is_alive() or opens < 20:
        try:
            st = DirectoryStore.open(s)
            assert len(st) >= 50 and st.moments().n == len(st)
        except StoreError as e:  # pragma: no cover - the defect under test
            failures += 1
            errors.append(str(e))
        opens += 1
    w.join()
    assert failures == 0, errors[:3]
    assert opens >= 20
    assert DirectoryStore.verify_at(s).ok


def test_pg_creation_race_gives_one_store_and_one_clear_error(pg_uri: str, tmp_path: Path
                                                              ) -> None:
    from conftest import with_schema

    from rscir.stores.postgres import PostgresStore

    for trial in range(5):
        uri = with_schema(pg_uri, f"race{trial}")
        barrier = threading.Barrier(3)
        results: list[str] = []

        def create(info: ModelInfo, results: list[str] = results,
                   barrier: threading.Barrier = barrier, uri: str = uri) -> None:
            barrier.wait()
            try:
                st = open_or_create_store(uri, info, tmp_path)
                st.add(vecs(3), items(0, 3))
                st.close()
                results.append("ok")
            except StoreError as e:
                results.append(f"{type(e).__name__}: {e}")
            except Exception as e:  # noqa: BLE001 - a raw database error is the defect
                results.append(f"RAW {type(e).__name__}: {e}")

        threads = [threading.Thread(target=create, args=(info,))
                   for info in (INFO, INFO, INFO2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not any(r.startswith("RAW") for r in results), results
        assert "ok" in results, results
        assert all(r == "ok" or "another process" in r or "built with model" in r
                   for r in results), results
        with PostgresStore.open(uri) as st:
            assert len(st) == 3 and PostgresStore.verify_at(uri).ok


def test_pg_verify_and_repair_moments(pg_uri: str, tmp_path: Path, capsys) -> None:
    import psycopg
    from conftest import with_schema

    uri = with_schema(pg_uri, "verify_pg")
    with open_or_create_store(uri, INFO, tmp_path) as st:
        st.add(vecs(30), items(0, 30))
    assert main(["verify", uri]) == 0
    from rscir.stores.postgres import split_uri

    with psycopg.connect(split_uri(uri)[0], autocommit=True) as conn:
        conn.execute("UPDATE verify_pg.moments SET n = 7")
    capsys.readouterr()
    assert main(["verify", uri]) == 1 and "moments" in capsys.readouterr().out
    assert main(["repair", uri]) == 0
    assert main(["verify", uri]) == 0
    with open_or_create_store(uri, INFO, tmp_path) as st:
        assert st.moments().n == 30
        np.testing.assert_allclose(st.moments().sumsq, Moments.of(st.embeddings).sumsq,
                                   atol=1e-9)
    capsys.readouterr()
    with pytest.raises(StoreLockedError), open_or_create_store(uri, INFO, tmp_path):
        open_or_create_store(uri, INFO, tmp_path)
