"""rscir.serve.uploads: allowlisted decoders, header-only refusals, reduction before any float
work (checked against hand-computed pixels), and the shared decode-memory budget."""

from __future__ import annotations

import io
import struct
import threading
import time
import zlib

import numpy as np
import pytest
from PIL import Image

from rscir.serve.uploads import (
    DecodeBudget,
    MiB,
    UploadDecoder,
    UploadError,
    UploadLimits,
    reduced_size,
    spool_upload,
    upload_token,
)


def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def png_header(w: int, h: int, color_type: int = 2) -> bytes:
    """A PNG signature + IHDR claiming w×h, one tiny IDAT: nothing behind the claim."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(
            ">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", w, h, 8, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


def refused(decoder: UploadDecoder, data: bytes) -> UploadError:
    with pytest.raises(UploadError) as e:
        decoder.decode(data)
    return e.value


# ----------------------------------------------------------------------------- formats
EPS = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n"
       b"newpath 0 0 moveto 10 10 lineto stroke\n%%EOF\n")


@pytest.mark.parametrize("data", [
    EPS,
    b"%!PS-Adobe-3.0\n%%Pages: 1\nshowpage\n",                      # PostScript
    b"\xc5\xd0\xd3\xc6" + struct.pack("<IIIIII", 30, len(EPS), 0, 0, 0, 0) + b"\xff\xff" + EPS,
    b"%PDF-1.4\n1 0 obj << >> endobj\ntrailer << >>\n%%EOF\n",
    encode(Image.new("RGB", (8, 8)), "GIF"),
    encode(Image.new("RGB", (16, 16)), "ICO"),
    encode(Image.new("RGB", (8, 8)), "PPM"),
    b"<svg xmlns='http://www.w3.org/2000/svg' width='10' height='10'/>",
])
def test_only_allowlisted_decoders_run(data: bytes, monkeypatch) -> None:
    """EPS/PS/PDF and every format outside JPEG/PNG/TIFF/WebP/BMP are 415, and Pillow's EPS
    plugin (which would hand the file to Ghostscript) is never even asked."""
    from PIL import EpsImagePlugin

    reached: list[str] = []
    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open",
                        lambda self: reached.append("eps") or (_ for _ in ()).throw(SyntaxError))
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript",
                        lambda *a, **k: reached.append("gs"), raising=False)
    e = refused(UploadDecoder(), data)
    assert e.status == 415 and "JPEG, PNG, TIFF" in e.detail
    assert reached == []


@pytest.mark.parametrize("fmt, mode, kw", [
    ("JPEG", "RGB", {}), ("JPEG", "L", {}), ("JPEG", "CMYK", {}),
    ("JPEG", "RGB", {"progressive": True}),
    ("PNG", "RGB", {}), ("PNG", "RGBA", {}), ("PNG", "LA", {}), ("PNG", "P", {}),
    ("PNG", "1", {}), ("PNG", "I;16", {}), ("WEBP", "RGB", {}), ("WEBP", "RGBA", {}),
    ("BMP", "RGB", {}), ("BMP", "P", {}), ("BMP", "L", {}),
])
def test_every_accepted_mode_becomes_reduced_rgb(fmt: str, mode: str, kw: dict) -> None:
    im = Image.new(mode, (1200, 900))
    out = UploadDecoder().decode(encode(im, fmt, **kw))
    assert out.mode == "RGB" and out.size == (683, 512)  # short side 512, aspect kept


def test_reduced_size_by_hand() -> None:
    assert reduced_size(300, 200, 512, 4096) == (300, 200)        # never enlarged
    assert reduced_size(3000, 2000, 512, 4096) == (768, 512)      # short side to 512
    assert reduced_size(2000, 3000, 512, 4096) == (512, 768)
    assert reduced_size(6000, 400, 512, 4096) == (4096, 273)      # long side bound wins
    assert reduced_size(20_000, 1000, 512, 4096) == (4096, 205)


def test_reduction_keeps_the_picture() -> None:
    """A 3000×2000 JPEG (decoded by DCT scaling) and PNG reduce to 768×512 and match a full
    decode resized the ordinary way: same picture, not just same size."""
    yy, xx = np.mgrid[0:2000, 0:3000]
    arr = np.stack([xx * 255 // 2999, yy * 255 // 1999, (xx + yy) % 256 // 2], -1).astype(np.uint8)
    full = Image.fromarray(arr)
    ref = np.asarray(full.resize((768, 512), Image.Resampling.BOX), np.float32)
    for fmt in ("JPEG", "PNG"):
        out = np.asarray(UploadDecoder().decode(encode(full, fmt, quality=95)), np.float32)
        assert out.shape == (512, 768, 3)
        assert np.abs(out - ref).mean() < 2.5, fmt


def test_sixteen_bit_grey_keeps_the_high_byte() -> None:
    im = Image.fromarray(np.full((40, 60), 0x8000, np.uint16))  # I;16
    out = np.asarray(UploadDecoder().decode(encode(im, "PNG")))
    assert out.shape == (40, 60, 3) and (out == 128).all()


def test_transparent_palette_png() -> None:
    im = Image.new("P", (30, 20), 1)
    im.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    out = np.asarray(UploadDecoder().decode(encode(im, "PNG", transparency=0)))
    assert (out == [10, 200, 30]).all()


# ----------------------------------------------------------------------------- header refusals
def test_thin_strip_is_refused_from_the_header(monkeypatch) -> None:
    """The 20×2,500,000 PNG (51 kB, inside the 50 Mpx cap) is 422 before any decoding."""
    data = encode(Image.new("L", (20, 2_500_000)), "PNG")
    assert len(data) < 60_000
    dec = UploadDecoder()
    monkeypatch.setattr(Image.Image, "load", lambda self: pytest.fail("decoded the strip"))
    t0 = time.perf_counter()
    e = refused(dec, data)
    assert time.perf_counter() - t0 < 1.0
    assert e.status == 422 and "20×2500000" in e.detail and "20 times" in e.detail
    assert dec.budget.in_use == 0


@pytest.mark.parametrize("w, h, status, words", [
    (100_000, 100_000, 413, "more than 50000000"),    # the pixel cap (a bomb header)
    (21_000, 2_000, 413, "at most 20000"),             # one side over the cap, aspect 10.5
    (5_000, 200, 422, "20 times"),                     # aspect 25
    (0, 10, 415, "not an image"),          # Pillow: no such PNG
])
def test_header_limits(w: int, h: int, status: int, words: str) -> None:
    e = refused(UploadDecoder(), png_header(w, h))
    assert e.status == status and words in e.detail


def test_limits_are_configurable() -> None:
    dec = UploadDecoder(UploadLimits(max_aspect=2.0, max_side=500))
    assert refused(dec, png_header(300, 100)).status == 422
    assert refused(dec, png_header(501, 400)).status == 413
    assert dec.decode(encode(Image.new("RGB", (200, 100)), "PNG")).size == (200, 100)
    with pytest.raises(ValueError):
        UploadLimits(max_aspect=0.5)


def test_empty_truncated_and_oversized_files() -> None:
    dec = UploadDecoder(UploadLimits(max_bytes=10_000))
    assert refused(dec, b"").status == 422
    good = encode(Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3),
                                                                     np.uint8)), "PNG")
    assert refused(dec, good[: len(good) // 2]).status == 422
    assert refused(dec, b"\x89PNG\r\n\x1a\n" + b"\0" * 20_000).status == 413


# ----------------------------------------------------------------------------- TIFF
def tiff_bytes(arr: np.ndarray, **kw) -> bytes:
    import tifffile

    buf = io.BytesIO()
    tifffile.imwrite(buf, arr, **kw)
    return buf.getvalue()


def stretch_ref(b: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(b, [2, 98])
    return np.clip((b - lo) / (hi - lo) * 255.0, 0, 255).astype(np.uint8)


def test_tiff_uint8_is_box_averaged_exactly() -> None:
    """2048×1024 RGB, tiled 256: reduced by 2 per side with 2×2 means, as numpy computes them."""
    rng = np.random.default_rng(3)
    arr = rng.integers(0, 256, (1024, 2048, 3), dtype=np.uint8)
    out = np.asarray(UploadDecoder().decode(tiff_bytes(arr, tile=(256, 256),
                                                       compression="zlib")))
    want = np.rint(arr.reshape(512, 2, 1024, 2, 3).astype(np.float64).mean(axis=(1, 3)))
    assert out.shape == (512, 1024, 3)
    np.testing.assert_array_equal(out, want.astype(np.uint8))


def test_tiff_uint16_multiband_strips() -> None:
    """4-band uint16 (RGB + extra), odd size, strips of 3 rows: bands 1-3, the remainder rows and
    columns dropped, 3×3 means, then ingestion's 2-98 percentile stretch."""
    rng = np.random.default_rng(4)
    arr = rng.integers(0, 4000, (1600, 1603, 4), dtype=np.uint16)
    data = tiff_bytes(arr, photometric="rgb", extrasamples=[0], rowsperstrip=3,
                      compression="zlib")
    out = np.asarray(UploadDecoder().decode(data)).astype(int)
    # reduced_size(1603, 1600) = (513, 512): box factor 3, then a resize to 513×512
    f = 3
    means = arr[: 533 * f, : 534 * f, :3].reshape(533, f, 534, f, 3).mean(axis=(1, 3))
    ref = np.stack([stretch_ref(means[..., c]) for c in range(3)], -1)
    ref = np.asarray(Image.fromarray(ref).resize((513, 512), Image.Resampling.BICUBIC)).astype(int)
    assert out.shape == (512, 513, 3)
    assert np.abs(out - ref).max() <= 1 and np.abs(out - ref).mean() < 0.05


def test_small_tiff_matches_ingestion(tmp_path) -> None:
    """Unreduced, an upload decodes as ingestion decodes the same file (±1 from float32)."""
    from rscir.ingest.images import load_image

    rng = np.random.default_rng(5)
    arr = rng.normal(1000, 300, (300, 200, 3)).astype(np.float32)
    data = tiff_bytes(arr, photometric="rgb")
    (tmp_path / "x.tif").write_bytes(data)
    ref = np.asarray(load_image(tmp_path / "x.tif")[0]).astype(int)
    out = np.asarray(UploadDecoder().decode(data)).astype(int)
    assert out.shape == ref.shape == (300, 200, 3)
    assert np.abs(out - ref).max() <= 1


def test_single_band_tiff_is_grey() -> None:
    arr = np.arange(64 * 48, dtype=np.uint8).reshape(48, 64)
    out = np.asarray(UploadDecoder().decode(tiff_bytes(arr)))
    assert out.shape == (48, 64, 3) and (out[..., 0] == arr).all() and (out[..., 2] == arr).all()


def test_bad_tiffs() -> None:
    dec = UploadDecoder()
    assert refused(dec, b"II*\x00" + b"\xff" * 100).status == 422
    cplx = tiff_bytes(np.ones((20, 20), np.complex64))
    assert refused(dec, cplx).status == 422
    big = tiff_bytes(np.zeros((3000, 20), np.uint8), rowsperstrip=3000, compression="zlib")
    assert refused(UploadDecoder(UploadLimits(max_aspect=20)), big).status == 422


# ----------------------------------------------------------------------------- memory budget
def test_budget_bounds_what_runs_at_once() -> None:
    budget = DecodeBudget(100)
    lock = threading.Lock()
    held = [0]
    top = [0]

    def work(n: int) -> None:
        with budget.reserve(n, timeout=30):
            with lock:
                held[0] += n
                top[0] = max(top[0], held[0])
            time.sleep(0.02)
            with lock:
                held[0] -= n

    threads = [threading.Thread(target=work, args=(n,)) for n in [40, 30, 60, 20, 90, 10] * 4]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert 60 <= top[0] <= 100 and budget.in_use == 0


def test_budget_is_first_come_first_served() -> None:
    budget = DecodeBudget(100)
    order: list[str] = []
    release = threading.Event()

    def hold(name: str, n: int) -> None:
        with budget.reserve(n, timeout=5):
            order.append(name)
            release.wait(5)

    with budget.reserve(60, timeout=5):
        big = threading.Thread(target=hold, args=("big", 90))
        big.start()
        time.sleep(0.1)  # the big one is queued first ...
        small = threading.Thread(target=hold, args=("small", 20))
        small.start()
        time.sleep(0.1)
        assert order == []  # ... so the small one, which would fit now, waits behind it
    time.sleep(0.1)
    assert order == ["big"] and budget.in_use == 90  # 90 + 20 > 100: the small one still waits
    release.set()
    big.join(5)
    small.join(5)
    assert order == ["big", "small"] and budget.in_use == 0


def test_budget_refusals() -> None:
    budget = DecodeBudget(100 * MiB)
    with pytest.raises(UploadError) as e, budget.reserve(101 * MiB, timeout=1):
        pass
    assert e.value.status == 413 and "100 MB" in e.value.detail
    with budget.reserve(80 * MiB, timeout=1):
        t0 = time.perf_counter()
        with pytest.raises(UploadError) as e, budget.reserve(30 * MiB, timeout=0.3):
            pass
        assert 0.25 < time.perf_counter() - t0 < 2
    assert e.value.status == 503 and e.value.headers == {"Retry-After": "5"}
    assert budget.in_use == 0


def test_decodes_reserve_their_estimate() -> None:
    """A 2000×2000 PNG needs ~16 MB decoded (+16 MB slack): 413 under an 8 MB budget, fine under
    a 64 MB one; a 256×256 one fits the small budget."""
    big = encode(Image.new("RGB", (2000, 2000)), "PNG")
    e = refused(UploadDecoder(UploadLimits(decode_memory=8 * MiB)), big)
    assert e.status == 413 and "needs about" in e.detail
    assert UploadDecoder(UploadLimits(decode_memory=64 * MiB)).decode(big).size == (512, 512)
    small = encode(Image.new("RGB", (64, 64)), "PNG")
    assert UploadDecoder(UploadLimits(decode_memory=17 * MiB)).decode(small).size == (64, 64)


def test_decodes_wait_for_each_other() -> None:
    """With room for one decode, a second waits (then succeeds) or, past wait_s, gets 503."""
    data = encode(Image.new("RGB", (2000, 2000)), "PNG")
    dec = UploadDecoder(UploadLimits(decode_memory=40 * MiB, wait_s=0.3))
    with dec.budget.reserve(30 * MiB, timeout=1):
        assert refused(dec, data).status == 503
    assert dec.decode(data).size == (512, 512)


# ----------------------------------------------------------------------------- spooling
def test_spool_and_token() -> None:
    import anyio

    class Part:  # the slice of Starlette's UploadFile that spool_upload uses
        def __init__(self, data: bytes) -> None:
            self.buf = io.BytesIO(data)

        async def read(self, n: int) -> bytes:
            return self.buf.read(n)

    data = np.random.default_rng(0).bytes(3 * MiB)
    f = anyio.run(spool_upload, Part(data), 4 * MiB)
    try:
        assert f._rolled  # past 1 MB the upload waits on disk, not in memory
        import hashlib

        assert upload_token(f) == hashlib.sha256(data).hexdigest() and f.read() == data
    finally:
        f.close()
    with pytest.raises(UploadError) as e:
        anyio.run(spool_upload, Part(data), 2 * MiB)
    assert e.value.status == 413
