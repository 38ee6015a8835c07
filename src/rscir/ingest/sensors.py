"""Band choice and 8-bit scaling of multispectral rasters: sensor presets and read settings.

RGB models see three bands as 8-bit RGB. Which bands, and how raw values (16-bit digital
numbers, reflectance floats) become 0–255, is a :class:`RasterRead`: bands by 1-based index or
by name (``B04``, ``red``), a sensor preset (:data:`PRESETS`) that names a standard band stack and
sets a fixed stretch and nodata, or a per-image percentile stretch when nothing says better.

Presets (the stretch is in raw values, so it is exact and the same for every chip of a scene):

=================  ==========================================  ======================  ======
preset             band stack (when the file does not name it)  RGB stretch (raw)       nodata
=================  ==========================================  ======================  ======
sentinel2-l2a      B01..B08, B8A, B09, B11, B12 (12 bands)      0–3000 (ρ 0–0.3)        0
sentinel2-l1c      B01..B08, B8A, B09, B10, B11, B12 (13)       0–3000 (ρ 0–0.3)        0
landsat-c2l2       SR_B1..SR_B7                                 7273–18182 (ρ 0–0.3)    0
naip               red, green, blue, nir (uint8)                0–255                   none
=================  ==========================================  ======================  ======

Sentinel-2 digital numbers are reflectance × 10000; products of processing baseline 04.00
and later (from January 2022) add 1000 (``BOA_ADD_OFFSET``): pass ``--stretch 1000,4000`` for
those. Landsat Collection 2 Level-2 surface reflectance is DN × 0.0000275 − 0.2.

Encoders that describe every band (``classic-ms``) get :meth:`RasterRead.to_reflectance`
instead: all bands as float32 in [0, 1], by the preset's reflectance scale (ρ, so near-infrared
and SWIR bands are not clipped at the RGB stretch's 0.3), else ``--stretch``, else 8-bit / 255,
else a 2–98 percentile stretch per band; masked pixels are NaN.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import InvalidArgumentError

S2_L2A = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B11", "B12")
S2_L1C = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B10", "B11",
          "B12")
S2_ALIASES = {"coastal": "B01", "blue": "B02", "green": "B03", "red": "B04", "rededge1": "B05",
              "rededge2": "B06", "rededge3": "B07", "nir": "B08", "nir08": "B8A",
              "nir09": "B09", "cirrus": "B10", "swir16": "B11", "swir22": "B12"}
LANDSAT = ("SR_B1", "SR_B2", "SR_B3", "SR_B4", "SR_B5", "SR_B6", "SR_B7")
LANDSAT_ALIASES = {"coastal": "SR_B1", "blue": "SR_B2", "green": "SR_B3", "red": "SR_B4",
                   "nir": "SR_B5", "nir08": "SR_B5", "swir16": "SR_B6", "swir22": "SR_B7",
                   **{f"B{i}": f"SR_B{i}" for i in range(1, 8)}}


@dataclass(frozen=True)
class SensorPreset:
    """A sensor's standard band stack, the bands of its RGB composite, stretch and nodata."""

    name: str
    bands: tuple[str, ...]
    rgb: tuple[str, str, str]
    stretch: tuple[float, float]
    nodata: float | None
    aliases: tuple[tuple[str, str], ...] = ()
    description: str = ""
    reflectance: tuple[float, float] = (1.0, 0.0)  # ρ = DN × scale + offset (all-band reads)

    def index_of(self, name: str) -> int | None:
        """1-based position of a band name (or alias) in the standard stack."""
        key = dict((k.lower(), v) for k, v in self.aliases).get(name.lower(), name)
        for i, b in enumerate(self.bands, start=1):
            if b.lower() == key.lower():
                return i
        return None


PRESETS: dict[str, SensorPreset] = {p.name: p for p in (
    SensorPreset("sentinel2-l2a", S2_L2A, ("B04", "B03", "B02"), (0.0, 3000.0), 0.0,
                 tuple(S2_ALIASES.items()), "Sentinel-2 L2A, DN = reflectance × 10000",
                 (1e-4, 0.0)),
    SensorPreset("sentinel2-l1c", S2_L1C, ("B04", "B03", "B02"), (0.0, 3000.0), 0.0,
                 tuple(S2_ALIASES.items()), "Sentinel-2 L1C, DN = reflectance × 10000",
                 (1e-4, 0.0)),
    SensorPreset("landsat-c2l2", LANDSAT, ("SR_B4", "SR_B3", "SR_B2"),
                 ((0.0 + 0.2) / 0.0000275, (0.3 + 0.2) / 0.0000275), 0.0,
                 tuple(LANDSAT_ALIASES.items()),
                 "Landsat 8/9 Collection 2 Level-2 SR, ρ = DN × 0.0000275 − 0.2",
                 (0.0000275, -0.2)),
    SensorPreset("naip", ("red", "green", "blue", "nir"), ("red", "green", "blue"),
                 (0.0, 255.0), None, (), "NAIP 4-band uint8 (R, G, B, NIR)", (1 / 255, 0.0)),
)}


def parse_bands(spec: str | Sequence[str | int] | None) -> tuple[str | int, ...] | None:
    """``"4,3,2"`` / ``"B04,B03,B02"`` → (4, 3, 2) / ("B04", "B03", "B02"); 1 or 3 bands."""
    if spec is None or spec == "":
        return None
    parts = [p.strip() for p in spec.split(",")] if isinstance(spec, str) else list(spec)
    out: list[str | int] = []
    for p in parts:
        if isinstance(p, int) or (isinstance(p, str) and p.isdigit()):
            if int(p) < 1:
                raise InvalidArgumentError(f"band indices start at 1, got {p}")
            out.append(int(p))
        elif p:
            out.append(str(p))
    if len(out) not in (1, 3):
        raise InvalidArgumentError(
            f"--bands takes 1 band (grey) or 3 (R,G,B), got {len(out)}: {spec!r}")
    return tuple(out)


def parse_stretch(spec: str | Sequence[float] | None) -> tuple[str, float, float] | None:
    """``"0,3000"`` (fixed, raw values) or ``"p2,p98"`` (percentiles per image) → a stretch."""
    if spec is None or spec == "":
        return None
    if isinstance(spec, str):
        a, _, b = spec.partition(",")
        if not b:
            raise InvalidArgumentError(f"--stretch takes LO,HI or pLO,pHI, got {spec!r}")
        if a.strip().lower().startswith("p") and b.strip().lower().startswith("p"):
            lo, hi = float(a.strip()[1:]), float(b.strip()[1:])
            if not 0 <= lo < hi <= 100:
                raise InvalidArgumentError(f"percentiles must satisfy 0 <= lo < hi <= 100: {spec}")
            return ("percentile", lo, hi)
        lo, hi = float(a), float(b)
    else:
        lo, hi = (float(x) for x in spec)
    if hi <= lo:
        raise InvalidArgumentError(f"--stretch needs LO < HI, got {spec!r}")
    return ("fixed", lo, hi)


@dataclass(frozen=True)
class RasterRead:
    """How a raster becomes an 8-bit RGB image: bands, stretch, nodata, minimum valid share.

    ``bands`` None: a preset's RGB bands, else the file's red/green/blue colour
    interpretation, else bands 1, 2, 3 (band 1 thrice for a single band). ``stretch`` None: the
    preset's fixed stretch, else uint8 as is, else a 2–98 percentile stretch per band of each
    image (or chip), computed over valid pixels.

    ``all_bands``: every band, as float32 reflectance (:meth:`to_reflectance`), for encoders
    that describe them all; set by the pipeline from the encoder, never stored in settings
    (thumbnails stay RGB)."""

    bands: tuple[str | int, ...] | None = None
    sensor: str | None = None
    stretch: tuple[str, float, float] | None = None
    nodata: float | None = None
    min_valid: float = 0.5
    all_bands: bool = False

    def check(self) -> RasterRead:
        if self.sensor is not None and self.sensor not in PRESETS:
            raise InvalidArgumentError(
                f"unknown sensor {self.sensor!r}; known: {', '.join(sorted(PRESETS))}")
        if not 0.0 <= self.min_valid <= 1.0:
            raise InvalidArgumentError(f"--min-valid must be in [0, 1], got {self.min_valid}")
        return self

    @property
    def preset(self) -> SensorPreset | None:
        return PRESETS[self.sensor] if self.sensor else None

    def to_dict(self) -> dict[str, Any]:
        return {"bands": list(self.bands) if self.bands else None, "sensor": self.sensor,
                "stretch": list(self.stretch) if self.stretch else None,
                "nodata": self.nodata, "min_valid": self.min_valid}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RasterRead:
        b = d.get("bands")
        s = d.get("stretch")
        return cls(bands=tuple(b) if isinstance(b, list) else None,
                   sensor=d.get("sensor"),
                   stretch=(str(s[0]), float(s[1]), float(s[2])) if isinstance(s, list) else None,
                   nodata=None if d.get("nodata") is None else float(d["nodata"]),
                   min_valid=float(d.get("min_valid", 0.5)))

    # ------------------------------------------------------------------ bands
    def band_indexes(self, count: int, descriptions: Sequence[str | None] = (),
                     colorinterp: Sequence[str] = ()) -> list[int]:
        """1-based band indexes of the RGB composite of a raster with ``count`` bands."""
        wanted: Sequence[str | int] | None = self.bands
        preset = self.preset
        if wanted is None and preset is not None and count > 3:
            wanted = preset.rgb
        if wanted is None:
            ci = [c.lower() for c in colorinterp]
            if all(c in ci for c in ("red", "green", "blue")):
                return [ci.index("red") + 1, ci.index("green") + 1, ci.index("blue") + 1]
            return [1, 2, 3] if count >= 3 else [1, 1, 1]
        names = [(d or "").strip().lower() for d in descriptions]
        out = []
        for b in wanted:
            if isinstance(b, int):
                i: int | None = b
            elif b.lower() in names:
                i = names.index(b.lower()) + 1
            elif preset is not None:
                i = preset.index_of(b)
            else:
                i = None
            if i is None:
                named = ", ".join(d for d in names if d) or "none"
                raise InvalidArgumentError(
                    f"band {b!r} not found (the file names its bands: {named}); give band "
                    "numbers (--bands 4,3,2) or a --sensor preset that knows the band order")
            if not 1 <= i <= count:
                raise InvalidArgumentError(f"band {b!r} is band {i}, but the file has {count}")
            out.append(i)
        return out * 3 if len(out) == 1 else out

    def all_band_indexes(self, count: int, colorinterp: Sequence[str] = ()) -> list[int]:
        """1-based indexes of every band of an all-band read: all but alpha bands (a mask)."""
        ci = [c.lower() for c in colorinterp] + [""] * count
        return [i for i in range(1, count + 1) if ci[i - 1] != "alpha"]

    def spectral_positions(self, count: int, names: Sequence[str | None] = ()
                           ) -> tuple[int | None, int | None]:
        """0-based (red, NIR) positions in an all-band read of ``count`` bands, when the band
        names (the file's descriptions) or the sensor preset's full stack say which they are;
        else None (the descriptor then has no NDVI block)."""
        low = [(n or "").strip().lower() for n in names]
        p = self.preset
        out: list[int | None] = []
        for role in ("red", "nir"):
            pos: int | None = None
            if p is not None:
                key = dict((k.lower(), v.lower()) for k, v in p.aliases).get(role, role)
                if key in low:
                    pos = low.index(key)
                elif not any(low) and count == len(p.bands):
                    i = p.index_of(role)
                    pos = None if i is None else i - 1
            if pos is None and role in low:
                pos = low.index(role)
            out.append(pos)
        return out[0], out[1]

    def nodata_value(self, file_nodata: float | None) -> float | None:
        """The value that marks missing pixels: given, else the file's, else the preset's."""
        if self.nodata is not None:
            return self.nodata
        if file_nodata is not None:
            return float(file_nodata)
        p = self.preset
        return p.nodata if p is not None else None

    # ------------------------------------------------------------------ pixels
    def to_uint8(self, bands: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
        """(C, H, W) raw values → (C, H, W) uint8; invalid pixels become 0."""
        stretch = self.stretch
        if stretch is None and self.preset is not None:
            stretch = ("fixed", *self.preset.stretch)
        if stretch is None and bands.dtype == np.uint8:
            out = bands.copy() if valid is not None else bands
            if valid is not None:
                out[:, ~valid] = 0
            return out
        # float64 and truncation, as rscir always scaled TIFFs (stores stay comparable)
        b = bands.astype(np.float64)
        if stretch is None or stretch[0] == "percentile":
            plo, phi = (2.0, 98.0) if stretch is None else (stretch[1], stretch[2])
            ok = np.isfinite(b) & (valid[None] if valid is not None else True)
            lo = np.zeros(len(b))
            hi = np.ones(len(b))
            for i in range(len(b)):  # a few bands: per-band percentiles over valid pixels
                v = b[i][ok[i]]
                if v.size:
                    lo[i], hi[i] = np.percentile(v, [plo, phi])
            hi = np.where(hi > lo, hi, lo + 1.0)
        else:
            lo = np.full(len(b), stretch[1])
            hi = np.full(len(b), stretch[2])
        lo3, hi3 = lo[:, None, None], hi[:, None, None]
        b = np.where(np.isnan(b), lo3, b)
        out = np.clip((b - lo3) / (hi3 - lo3) * 255.0, 0, 255).astype(np.uint8)
        if valid is not None:
            out[:, ~valid] = 0
        return out

    def to_reflectance(self, bands: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
        """(C, H, W) raw values → (C, H, W) float32 in [0, 1], NaN where not ``valid``: the
        preset's reflectance scale (ρ = DN × scale + offset, unless ``--stretch`` is given),
        else the fixed or percentile ``--stretch``, else uint8 / 255, else a 2–98 percentile
        stretch per band over valid pixels. Reflectance, not the RGB stretch, so that bright
        NIR/SWIR bands keep their contrast."""
        b = bands.astype(np.float64)
        ok = np.isfinite(b) & (valid[None] if valid is not None else True)
        p = self.preset
        if self.stretch is None and p is not None:
            out = b * p.reflectance[0] + p.reflectance[1]
        elif self.stretch is None and bands.dtype == np.uint8:
            out = b / 255.0
        else:
            if self.stretch is not None and self.stretch[0] == "fixed":
                lo = np.full(len(b), self.stretch[1])
                hi = np.full(len(b), self.stretch[2])
            else:
                plo, phi = (2.0, 98.0) if self.stretch is None else self.stretch[1:]
                lo, hi = np.zeros(len(b)), np.ones(len(b))
                for i in range(len(b)):  # per band over its valid pixels
                    v = b[i][ok[i]]
                    if v.size:
                        lo[i], hi[i] = np.percentile(v, [plo, phi])
                hi = np.where(hi > lo, hi, lo + 1.0)
            out = (b - lo[:, None, None]) / (hi - lo)[:, None, None]
        out = np.clip(out, 0.0, 1.0).astype(np.float32)
        out[:, ~ok.all(axis=0)] = np.nan
        return out
