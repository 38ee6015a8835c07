"""A missing optional package is one line naming the ``pip install 'rscir[EXTRA]'`` to run
(exit status 2, no traceback), for every optional dependency a command reaches."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

from rscir.cli import main
from rscir.cli.extras import OPTIONAL, SERVE_MODULES, hint_for, installed, require
from rscir.errors import MissingDependencyError

PG = "postgresql://nobody@127.0.0.1:9/nowhere"


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from conftest import make_image_folder

    root = tmp_path_factory.mktemp("hints")
    folder = make_image_folder(root / "images", {"beach": 3, "harbor": 3})
    rc = main(["index", str(folder), "--store", str(root / "s"), "--model", "rscir-tiny",
               "--no-progress", "--workers", "0", "--device", "cpu"])
    assert rc == 0
    return root / "s"


CASES = [
    ("fastapi", lambda s: ["serve", str(s), "--port", "0"], "serve", "fastapi"),
    ("uvicorn", lambda s: ["serve", str(s), "--port", "0"], "serve", "uvicorn"),
    ("python_multipart", lambda s: ["serve", str(s), "--port", "0"], "serve", "python-multipart"),
    ("psycopg", lambda s: ["info", PG], "pg", "psycopg"),
    ("psycopg", lambda s: ["search", PG, "--item-id", "0", "--method", "image"], "pg", "psycopg"),
    ("psycopg", lambda s: ["serve", PG, "--port", "0"], "pg", "psycopg"),
    ("ray", lambda s: ["index", str(s.parent / "images"), "--store", str(s), "--ray"], "ray",
     "ray"),
]


@pytest.mark.parametrize(("blocked", "argv", "extra", "package"), CASES,
                         ids=[f"{c[0]}-{c[1](Path('s'))[0]}" for c in CASES])
def test_missing_extra_is_one_line(store: Path, blocked: str, argv, extra: str, package: str,
                                   monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, blocked, None)  # `import blocked` now fails
    args = argv(store)
    rc = main(args)
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"rscir {args[0]}: error: ")
    assert f"Python package '{package}'" in err
    assert err.rstrip().endswith(f"pip install 'rscir[{extra}]'")


def test_end_to_end_in_a_new_process(store: Path, tmp_path: Path) -> None:
    """As a user sees it: `rscir serve` without fastapi, in a fresh interpreter."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import sys\nfor m in ('fastapi', 'uvicorn'):\n    sys.modules[m] = None\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(site), str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    p = subprocess.run([sys.executable, "-m", "rscir.cli", "serve", str(store), "--port", "0"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr == ("rscir serve: error: rscir serve needs the Python package 'fastapi', "
                        "which is not installed: pip install 'rscir[serve]'\n")


def test_helpers(monkeypatch: pytest.MonkeyPatch) -> None:
    assert installed("json") and not installed("no_such_module_rscir")
    assert set(SERVE_MODULES) <= set(OPTIONAL)
    for mod, (_, extra) in OPTIONAL.items():
        assert extra in ("serve", "pg", "ray", "test"), mod
    pyproject = (REPO / "pyproject.toml").read_text()
    for _, (package, extra) in OPTIONAL.items():  # every named package is in its extra
        line = next(x for x in pyproject.splitlines() if x.startswith(f"{extra} = ["))
        assert f'"{package.split("[")[0]}' in line, (package, extra)
    monkeypatch.setitem(sys.modules, "uvicorn", None)
    with pytest.raises(MissingDependencyError, match=r"'uvicorn'.*rscir\[serve\]"):
        require(SERVE_MODULES, "x")
    e = ModuleNotFoundError("No module named 'ray.data'", name="ray.data")
    assert "rscir[ray]" in str(hint_for(e, "rscir index"))
    assert hint_for(ModuleNotFoundError("x", name="numpy"), "rscir search") is None


def test_server_refuses_without_uvicorn(monkeypatch: pytest.MonkeyPatch) -> None:
    from rscir.serve.server import bind_socket, make_server

    monkeypatch.setitem(sys.modules, "uvicorn", None)
    sock = bind_socket("127.0.0.1", 0)
    try:
        with pytest.raises(MissingDependencyError, match=r"pip install 'rscir\[serve\]'"):
            make_server(object(), sock)
    finally:
        sock.close()
