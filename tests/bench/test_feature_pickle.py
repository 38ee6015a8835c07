"""PatternCom feature pickles are untrusted files: only numpy arrays and plain containers load,
anything else is refused before it can run (naming --trust-pickle), and the reference layout
round-trips under every pickle protocol and both numpy module layouts."""

from __future__ import annotations

import collections
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from rscir.bench.fixtures import make_patterncom
from rscir.bench.patterncom import load_database
from rscir.cli import main
from rscir.errors import UntrustedFileError


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    return make_patterncom(tmp_path_factory.mktemp("pc"), per_class=4, dim=16, seed=1)


class _Run:
    """Unpickling this runs ``fn(*args)``: the classic malicious pickle."""

    def __init__(self, fn, *args) -> None:
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def evil_pickles(marker: Path, feats: np.ndarray, paths: list[str]) -> dict[str, bytes]:
    cmd = f"touch {marker}"
    obj_arr = np.empty(2, dtype=object)
    obj_arr[0] = _Run(os.system, cmd)
    return {
        "os.system": pickle.dumps({"feats": feats, "paths": paths, "x": _Run(os.system, cmd)}),
        "eval": pickle.dumps(_Run(eval, f"__import__('os').system({cmd!r})"), protocol=2),
        "exec-first": pickle.dumps([_Run(exec, f"open({str(marker)!r}, 'w')"), feats]),
        "inside-object-array": pickle.dumps({"feats": obj_arr, "paths": paths}, protocol=4),
        # getattr(__import__('os'), 'system')(cmd), written by hand in protocol 0
        "getattr": (b"c__builtin__\ngetattr\n(c__builtin__\n__import__\n(S'os'\ntRS'system'\ntR"
                    b"(S'" + cmd.encode() + b"'\ntR."),
    }


def test_evil_pickles_are_not_executed(fx, tmp_path) -> None:
    marker = tmp_path / "pwned"
    for name, data in evil_pickles(marker, fx.features, fx.paths).items():
        f = tmp_path / f"{name}.pkl"
        f.write_bytes(data)
        with pytest.raises(UntrustedFileError) as e:
            load_database(f)
        assert "--trust-pickle" in str(e.value) and str(f) in str(e.value), name
        assert not marker.exists(), f"{name} ran code"


def test_cli_refuses_the_evil_pickle_in_one_line(fx, tmp_path, capsys) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(evil_pickles(marker, fx.features, fx.paths)["os.system"])
    rc = main(["bench", "patterncom", "--data", str(fx.root), "--features", str(evil),
               "--text-features", str(fx.text_features_path), "--out", str(tmp_path / "o"),
               "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and not marker.exists()
    assert err.count("\n") == 1 and err.startswith("rscir bench: error: ")
    assert "posix.system" in err and "--trust-pickle" in err


def test_codecs_other_than_latin1_are_refused(tmp_path) -> None:
    f = tmp_path / "codec.pkl"
    # protocol-2 style bytes: _codecs.encode('...', <codec>) with a codec that is not latin-1
    f.write_bytes(b"\x80\x02c_codecs\nencode\nX\x02\x00\x00\x00hiX\x05\x00\x00\x00rot13\x86R.")
    with pytest.raises(UntrustedFileError, match="rot13"):
        load_database(f)


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_reference_layout_round_trips(fx, tmp_path, protocol: int) -> None:
    """Arrays (float, str, structured, object, non-contiguous), numpy scalars, sets, bytes and
    OrderedDicts load exactly as pickle.load reads them."""
    extra = {"labels": fx.labels, "n": np.int64(7), "x": np.float32(0.5), "set": {1, 2},
             "frozen": frozenset("ab"), "raw": b"\x00\xff", "buf": bytearray(b"z"), "c": 2j,
             "od": collections.OrderedDict(a=1), "names": np.array(fx.paths[:3]),
             "rec": np.zeros(2, [("a", "f4"), ("b", "i8")]), "view": fx.features[:, ::2],
             "objs": np.array([{"k": [1, 2]}, None], dtype=object)}
    f = tmp_path / "feats.pkl"
    f.write_bytes(pickle.dumps({"feats": fx.features, "paths": fx.paths, **extra}, protocol))
    db = load_database(f)
    np.testing.assert_array_equal(db.features, fx.features)
    assert db.features.dtype == fx.features.dtype and db.paths == fx.paths
    from rscir.bench.patterncom import FeatureUnpickler

    with open(f, "rb") as fh:
        ours = FeatureUnpickler(fh, str(f)).load()
    with open(f, "rb") as fh:
        ref = pickle.load(fh)
    assert ours.keys() == ref.keys()
    for k in ref:
        if isinstance(ref[k], np.ndarray):
            assert ours[k].dtype == ref[k].dtype
            assert np.array_equal(ours[k], ref[k]) or ref[k].dtype == object
        else:
            assert ours[k] == ref[k] and type(ours[k]) is type(ref[k]), k
    assert list(ours["objs"]) == list(ref["objs"])


def test_numpy1_pickles_load(fx, tmp_path) -> None:
    """Pickles written under numpy 1 name numpy.core.multiarray."""
    data = pickle.dumps({"feats": fx.features, "paths": fx.paths}, protocol=2)
    assert b"numpy._core.multiarray" in data
    f = tmp_path / "np1.pkl"
    f.write_bytes(data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    np.testing.assert_array_equal(load_database(f).features, fx.features)


def test_trust_pickle_admits_other_objects(fx, tmp_path, capsys) -> None:
    f = tmp_path / "counter.pkl"
    f.write_bytes(pickle.dumps({"feats": fx.features, "paths": fx.paths,
                                "stats": collections.Counter("aab")}))
    with pytest.raises(UntrustedFileError, match="collections.Counter"):
        load_database(f)
    assert load_database(f, trust_pickle=True).paths == fx.paths
    base = ["bench", "patterncom", "--data", str(fx.root), "--features", str(f),
            "--text-features", str(fx.text_features_path), "--methods", "text", "--attributes",
            "shape", "--out", str(tmp_path / "o"), "--no-progress"]
    assert main(base) == 2 and "--trust-pickle" in capsys.readouterr().err
    assert main([*base, "--trust-pickle"]) == 0


def test_unreadable_files_are_one_clear_error(tmp_path) -> None:
    for data in (b"not a pickle", b"\x80\x04", pickle.dumps([1, 2])[:-3]):
        f = tmp_path / "bad.pkl"
        f.write_bytes(data)
        with pytest.raises(ValueError, match="neither an rscir store nor a readable pickle"):
            load_database(f)
