"""The numpy MiniLM text tower gives sentence-transformers' embeddings, without torch."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO

from rscir.encoders.minilm import MiniLMText

TEXTS = [
    "with boats",
    "  with boats  ",
    "kidney-shaped",
    "",
    "a",
    "Ünïcödé café 東京 🚀 emoji",
    "many boats in a harbor " * 80,  # > 256 tokens: truncated as sentence-transformers does
    "denser",
    "A parking lot with MANY cars, near a road.",
    "\t\n",
    "storage tanks next to a river",
    "x" * 1000,
]


@pytest.fixture(scope="module")
def minilm() -> MiniLMText:
    return MiniLMText().load()


@pytest.fixture(scope="module")
def reference() -> np.ndarray:
    st = pytest.importorskip("sentence_transformers")
    model = st.SentenceTransformer(MiniLMText.model_path(), device="cpu")
    return model.encode(TEXTS, batch_size=128, convert_to_numpy=True, normalize_embeddings=True)


def test_equals_sentence_transformers(minilm: MiniLMText, reference: np.ndarray) -> None:
    out = minilm.encode(TEXTS)
    assert out.dtype == np.float32 and out.shape == (len(TEXTS), 384)
    np.testing.assert_allclose(out, reference, rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-6)


def test_batching_does_not_change_embeddings(minilm: MiniLMText, reference: np.ndarray) -> None:
    small = MiniLMText(batch_size=2).load()
    np.testing.assert_allclose(small.encode(TEXTS), reference, rtol=0, atol=1e-6)
    one = np.stack([minilm.encode([t])[0] for t in TEXTS[:4]])
    np.testing.assert_allclose(one, reference[:4], rtol=0, atol=1e-6)
    assert minilm.encode([]).shape == (0, 384)


def test_meaning_survives(minilm: MiniLMText) -> None:
    e = minilm.encode(["many boats in a harbor", "ships docked at a port", "a green forest"])
    assert e[0] @ e[1] > e[0] @ e[2] + 0.2


def test_imports_neither_torch_nor_transformers() -> None:
    code = (
        "import json, sys\n"
        "from rscir.encoders.minilm import MiniLMText\n"
        "e = MiniLMText().encode(['with boats'])\n"
        "print(json.dumps([e.shape[1], [m for m in ('torch', 'transformers', "
        "'sentence_transformers') if m in sys.modules]]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=REPO, check=True)
    dim, heavy = json.loads(out.stdout)
    assert dim == 384 and heavy == []
