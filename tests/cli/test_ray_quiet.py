"""A successful ``rscir index --ray`` prints no line that looks like an error: Ray's benign
core-worker warning (ray-project/ray#57733) is dropped from stderr, everything else passes."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from rscir.ingest import ray_data

BENIGN = (b"[2026-12-01 15:13:17,336 E 22293 22293] core_worker.cc:2465: Actor with class name: "
          b"'MapWorker(MapBatches(_EmbedActor))' and ID: '539e' has constructor arguments in the "
          b"object store and max_restarts > 0. If the arguments in the object store go out of "
          b"scope or are lost, the actor restart will fail.\n")


def test_filter_drops_only_the_benign_line(capfd: pytest.CaptureFixture[str]) -> None:
    with ray_data._filtered_stderr(ray_data.RAY_BENIGN_STDERR):
        os.write(2, b"indexing:  38%|###   | 75/200\r")  # a progress bar: no newline
        os.write(2, BENIGN)
        os.write(2, b"[2026-12-01 15:13:18,000 E 1 1] raylet.cc:1: a real error\n")
        os.write(2, b"last words")
    err = capfd.readouterr().err
    assert err == ("indexing:  38%|###   | 75/200\r"
                   "[2026-12-01 15:13:18,000 E 1 1] raylet.cc:1: a real error\nlast words")
    os.write(2, BENIGN)  # outside the block: untouched
    assert capfd.readouterr().err == BENIGN.decode()


@pytest.mark.slow
def test_index_with_ray_is_quiet(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("ray")
    from conftest import make_image_folder

    from rscir.cli import main

    folder = make_image_folder(tmp_path / "images", {"beach": 3, "harbor": 3})
    rc = main(["index", str(folder), "--store", str(tmp_path / "s"), "--model", "rscir-tiny",
               "--ray", "local", "--no-progress", "--device", "cpu"])
    out, err = capfd.readouterr()
    assert rc == 0 and "indexed 6 new/changed items" in out
    assert "core_worker" not in err
    assert not re.search(r"^\[[^\]]* E \d+ \d+\]", err, re.M), err  # no C++ error-level line
    assert "Starting execution of Dataset" not in err and "Progress bars disabled" not in err
