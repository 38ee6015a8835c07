"""Contact sheets: the query image and text, then the top-k thumbnails with rank and score —
one row per λ, as in Figure 1 of the WeiCom paper."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from .errors import InvalidArgumentError
from .search.results import SearchResult, score_decimals
from .stores.base import EmbeddingStore


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """A TrueType font with Greek glyphs (λ): matplotlib's bundled DejaVu Sans, else PIL's default."""
    try:
        from matplotlib import font_manager

        return ImageFont.truetype(font_manager.findfont("DejaVu Sans"), size)
    except Exception:  # noqa: BLE001 - any font problem falls back to PIL's own font
        try:
            return ImageFont.load_default(size=size)
        except TypeError:  # Pillow < 10.1
            return ImageFont.load_default()


def _thumb(store: EmbeddingStore, rel: str, size: int) -> Image.Image:
    """An item's thumbnail (a chip as the chip, not its scene); grey when it has no image."""
    from .ingest.render import item_image

    try:
        im = item_image(store, rel)
    except (ValueError, OSError):  # undecodable, missing (imported items), outside the root
        im = Image.new("RGB", (size, size), (90, 90, 90))
    im = im.copy()
    im.thumbnail((size, size))
    canvas = Image.new("RGB", (size, size), (255, 255, 255))
    canvas.paste(im, ((size - im.width) // 2, (size - im.height) // 2))
    return canvas


def contact_sheet(
    store: EmbeddingStore,
    results: Sequence[SearchResult],
    query_image: Image.Image | None,
    out: str | os.PathLike[str],
    *,
    thumb: int = 128,
) -> Path:
    """Write a PNG: a row per result (e.g. per λ) with the query at the left."""
    if not results:
        raise InvalidArgumentError("no results to draw")
    k = max(len(r.hits) for r in results)
    pad, label_h = 6, 30
    left_w = thumb + 2 * pad
    text = " + ".join(results[0].texts) or "(no text)"
    head_h = 28
    w = left_w + k * (thumb + pad) + pad
    h = head_h + len(results) * (thumb + label_h + pad) + pad
    sheet = Image.new("RGB", (w, h), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    f_big, f_small = _font(16), _font(12)
    draw.text((pad, 6), f"query text: \"{text}\"   method: {results[0].method}", fill=(0, 0, 0), font=f_big)
    for ri, res in enumerate(results):
        y = head_h + ri * (thumb + label_h + pad)
        if query_image is not None:
            q = query_image.convert("RGB").copy()
            q.thumbnail((thumb, thumb))
            sheet.paste(q, (pad, y))
            draw.rectangle([pad - 2, y - 2, pad + q.width + 1, y + q.height + 1], outline=(0, 90, 200), width=2)
        draw.text((pad, y + thumb + 4), f"λ = {res.lam:g}", fill=(0, 90, 200), font=f_small)
        dec = score_decimals([h.score for h in res.hits], lo=3)  # WeiCom scores crowd near 1
        for hi, hit in enumerate(res.hits):
            x = left_w + hi * (thumb + pad)
            sheet.paste(_thumb(store, hit.path, thumb), (x, y))
            draw.text((x, y + thumb + 2), f"#{hit.rank}  {hit.score:.{dec}f}", fill=(0, 0, 0),
                      font=f_small)
            if hit.label:
                draw.text((x, y + thumb + 15), str(hit.label)[:22], fill=(80, 80, 80), font=f_small)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out
