"""Image–text pairs for contrastive training, kept apart from models (as in torchgeo).

Three sources, merged by image path (an image may collect captions from several):

* a captions file — JSONL (``{"image": ..., "captions": [...], "split": "train"}``) or CSV
  (``image``/``path`` column, ``caption`` or ``captions`` column (``|``-separated), optional
  ``split``; several rows per image are merged);
* a class-folder archive (``ROOT/<class>/*.jpg``) turned into captions by templates such as
  ``"an aerial image of {class}"``;
* a multi-label CSV (``image`` column, one 0/1 column per object) turned into a phrase such as
  ``"an aerial image with buildings, cars and trees"``.

Images of a captions file's held-out split (``test`` by default) are excluded from *every*
source, so a test image can never leak in through its labels or its folder.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import InvalidArgumentError, PathNotFoundError

IMAGE_EXTS = frozenset({".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp"})

DEFAULT_TEMPLATES = (
    "an aerial image of {class}",
    "a satellite image of {class}",
    "an overhead view of {class}",
)
DEFAULT_MULTILABEL_TEMPLATE = "an aerial image with {labels}"


@dataclass
class PairSet:
    """Images (absolute paths), their captions, a class label for image-to-image metrics, and a
    positive *group* per caption: captions in the same group are positives for each other in
    the contrastive loss (templates of one class say the same thing in different words)."""

    paths: list[str] = field(default_factory=list)
    captions: list[list[str]] = field(default_factory=list)
    groups: list[list[str]] = field(default_factory=list)
    labels: list[str | None] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.paths)

    def __post_init__(self) -> None:
        n = len(self.paths)
        if not (len(self.captions) == len(self.groups) == len(self.labels) == n):
            raise InvalidArgumentError("paths, captions, groups and labels must have the same length")

    @classmethod
    def merge(cls, sets: Iterable[PairSet]) -> PairSet:
        """Union by path; captions of the same image are concatenated (duplicates dropped)."""
        order: dict[str, int] = {}
        out = cls()
        for s in sets:
            for p, caps, grps, lab in zip(s.paths, s.captions, s.groups, s.labels, strict=True):
                i = order.get(p)
                if i is None:
                    order[p] = len(out.paths)
                    out.paths.append(p)
                    out.captions.append([])
                    out.groups.append([])
                    out.labels.append(lab)
                    i = order[p]
                elif out.labels[i] is None:
                    out.labels[i] = lab
                for c, g in zip(caps, grps, strict=True):
                    if c not in out.captions[i]:
                        out.captions[i].append(c)
                        out.groups[i].append(g)
        return out

    def subset(self, idx: Sequence[int] | np.ndarray) -> PairSet:
        idx = [int(i) for i in idx]
        return PairSet(
            [self.paths[i] for i in idx],
            [list(self.captions[i]) for i in idx],
            [list(self.groups[i]) for i in idx],
            [self.labels[i] for i in idx],
        )

    def without(self, paths: Iterable[str]) -> PairSet:
        """Drop the given images (absolute paths) and images that have no caption."""
        drop = {os.path.normpath(p) for p in paths}
        keep = [i for i, p in enumerate(self.paths) if p not in drop and self.captions[i]]
        return self.subset(keep)

    def split(self, fraction: float, seed: int) -> tuple[PairSet, PairSet]:
        """(train, held-out): a seeded random ``fraction`` of images is held out."""
        if not 0.0 <= fraction < 1.0:
            raise InvalidArgumentError(f"held-out fraction must be in [0, 1), got {fraction}")
        n = len(self)
        n_val = int(round(n * fraction))
        perm = np.random.default_rng(seed).permutation(n)
        val = np.sort(perm[:n_val])
        train = np.sort(perm[n_val:])
        return self.subset(train), self.subset(val)

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for p, caps in zip(self.paths, self.captions, strict=True):
            h.update(p.encode())
            for c in caps:
                h.update(b"\x00" + c.encode())
            h.update(b"\x01")
        return h.hexdigest()[:16]

    def summary(self) -> str:
        n_caps = sum(len(c) for c in self.captions)
        uniq = len({c for caps in self.captions for c in caps})
        return f"{len(self)} images, {n_caps} captions ({uniq} distinct)"


@dataclass(frozen=True)
class Vocabulary:
    """Distinct captions as integer ids (``texts[id]``), with each id's positive group."""

    texts: list[str]
    group_of: np.ndarray

    @classmethod
    def build(cls, *sets: PairSet) -> Vocabulary:
        vocab: dict[str, int] = {}
        groups: dict[str, int] = {}
        group_of: list[int] = []
        for s in sets:
            for caps, grps in zip(s.captions, s.groups, strict=True):
                for c, g in zip(caps, grps, strict=True):
                    if c not in vocab:
                        vocab[c] = len(vocab)
                        group_of.append(groups.setdefault(g, len(groups)))
        return cls(list(vocab), np.asarray(group_of, np.int64))

    def encode(self, s: PairSet) -> tuple[np.ndarray, np.ndarray]:
        """(ids, offsets): image i owns caption ids ``ids[offsets[i]:offsets[i + 1]]``."""
        pos = {t: i for i, t in enumerate(self.texts)}
        ids = [pos[c] for caps in s.captions for c in caps]
        counts = [len(c) for c in s.captions]
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        return np.asarray(ids, np.int64), offsets


# ---------------------------------------------------------------------------------------------
# sources


def _norm(p: str | os.PathLike[str]) -> str:
    return os.path.normpath(os.path.abspath(p))


def _resolve_root(file: Path, first: str, root: str | os.PathLike[str] | None) -> Path:
    """Image paths in a table are relative to ``root`` if given, else to the table's folder or
    its ``images/`` sub-folder (the UCM layout), whichever holds the first listed image."""
    if root is not None:
        return Path(root)
    for cand in (file.parent, file.parent / "images"):
        if (cand / first).exists():
            return cand
    raise PathNotFoundError(
        f"cannot find image {first!r} listed in {file} next to it or under {file.parent / 'images'}; "
        "pass the image folder with --image-root"
    )


def _label_of(rel: str) -> str | None:
    parent = Path(rel).parent.name
    return parent or None


def read_captions(
    file: str | os.PathLike[str],
    *,
    root: str | os.PathLike[str] | None = None,
    splits: Sequence[str] | None = ("train",),
) -> PairSet:
    """Captions from JSONL or CSV; keeps rows whose ``split`` is in ``splits`` (rows without a
    split column are kept). ``splits=None`` keeps every row."""
    path = Path(file)
    if not path.is_file():
        raise PathNotFoundError(f"captions file not found: {path}")
    rows: list[tuple[str, list[str], str | None]] = []
    if path.suffix.lower() in (".jsonl", ".json", ".ndjson"):
        with path.open(encoding="utf-8") as f:
            for ln, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise InvalidArgumentError(f"{path}:{ln}: not valid JSON ({e})") from e
                img = obj.get("image") or obj.get("path") or obj.get("filename")
                caps = obj.get("captions", obj.get("caption"))
                if img is None or caps is None:
                    raise InvalidArgumentError(f"{path}:{ln}: needs 'image' and 'captions' (or 'caption')")
                caps = [caps] if isinstance(caps, str) else list(caps)
                rows.append((str(img), [str(c) for c in caps], obj.get("split")))
    else:
        with path.open(encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            cols = {c.lower(): c for c in (reader.fieldnames or [])}
            icol = cols.get("image") or cols.get("path") or cols.get("filename")
            ccol = cols.get("caption") or cols.get("captions") or cols.get("text")
            if icol is None or ccol is None:
                raise InvalidArgumentError(
                    f"{path}: a captions CSV needs an 'image' (or 'path') and a 'caption' column; "
                    f"found {reader.fieldnames}"
                )
            scol = cols.get("split")
            for r in reader:
                caps = [c.strip() for c in (r[ccol] or "").split("|") if c.strip()]
                rows.append((r[icol], caps, r[scol] if scol else None))
    if not rows:
        raise InvalidArgumentError(f"{path}: no captions found")
    base = _resolve_root(path, rows[0][0], root)
    merged: dict[str, tuple[list[str], str | None]] = {}
    for img, caps, split in rows:
        if splits is not None and split is not None and split not in splits:
            continue
        caps = [" ".join(c.split()) for c in caps if c.strip()]
        entry = merged.setdefault(_norm(base / img), ([], _label_of(img)))
        entry[0].extend(c for c in caps if c not in entry[0])
    paths = list(merged)
    return PairSet(
        paths,
        [merged[p][0] for p in paths],
        [list(merged[p][0]) for p in paths],
        [merged[p][1] for p in paths],
    )


def heldout_images(
    file: str | os.PathLike[str],
    *,
    root: str | os.PathLike[str] | None = None,
    splits: Sequence[str] = ("test",),
) -> PairSet:
    """The images (with their captions) of a captions file's held-out split."""
    return read_captions(file, root=root, splits=tuple(splits))


def class_phrase(name: str, phrases: Mapping[str, str] | None = None) -> str:
    """Folder/label name -> words: explicit mapping first, else '-'/'_' become spaces."""
    if phrases and name in phrases:
        return phrases[name]
    return name.replace("_", " ").replace("-", " ")


def read_class_folders(
    root: str | os.PathLike[str],
    *,
    templates: Sequence[str] = DEFAULT_TEMPLATES,
    phrases: Mapping[str, str] | None = None,
) -> PairSet:
    """``ROOT/<class>/<image>``: every image gets the templates filled with its class phrase."""
    base = Path(root)
    if not base.is_dir():
        raise InvalidArgumentError(f"class-folder archive not found: {base}")
    if not templates:
        raise InvalidArgumentError("at least one caption template is needed")
    for t in templates:
        if "{class}" not in t:
            raise InvalidArgumentError(f"template {t!r} must contain '{{class}}'")
    out = PairSet()
    for cls_dir in sorted(d for d in base.iterdir() if d.is_dir()):
        phrase = class_phrase(cls_dir.name, phrases)
        caps = [t.replace("{class}", phrase) for t in templates]
        for f in sorted(cls_dir.rglob("*")):
            if f.is_file() and f.suffix.lower() in IMAGE_EXTS:
                out.paths.append(_norm(f))
                out.captions.append(list(caps))
                out.groups.append([f"class:{phrase}"] * len(caps))
                out.labels.append(cls_dir.name)
    if not out.paths:
        raise InvalidArgumentError(f"no images found in class folders under {base}")
    return out


def join_phrases(words: Sequence[str]) -> str:
    """['a'] -> 'a'; ['a', 'b'] -> 'a and b'; ['a', 'b', 'c'] -> 'a, b and c'."""
    if len(words) <= 1:
        return "".join(words)
    return ", ".join(words[:-1]) + " and " + words[-1]


def read_multilabels(
    file: str | os.PathLike[str],
    *,
    root: str | os.PathLike[str] | None = None,
    template: str = DEFAULT_MULTILABEL_TEMPLATE,
    phrases: Mapping[str, str] | None = None,
) -> PairSet:
    """A 0/1 multi-label CSV -> one phrase per image listing its present labels (in column
    order); images with no label are skipped."""
    path = Path(file)
    if not path.is_file():
        raise PathNotFoundError(f"multi-label file not found: {path}")
    if "{labels}" not in template:
        raise InvalidArgumentError(f"template {template!r} must contain '{{labels}}'")
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if not header:
            raise InvalidArgumentError(f"{path}: empty multi-label file")
        rows = [r for r in reader if r]
    lower = [h.lower() for h in header]
    icol = next((lower.index(k) for k in ("image", "path", "filename") if k in lower), 0)
    label_cols = [j for j in range(len(header)) if j != icol]
    if not rows:
        raise InvalidArgumentError(f"{path}: no rows")
    base = _resolve_root(path, rows[0][icol], root)
    out = PairSet()
    for ln, r in enumerate(rows, 2):
        try:
            present = [header[j] for j in label_cols if float(r[j]) > 0]
        except (ValueError, IndexError) as e:
            raise InvalidArgumentError(f"{path}:{ln}: label values must be 0/1 numbers ({e})") from e
        if not present:
            continue
        cap = template.replace("{labels}", join_phrases([class_phrase(w, phrases) for w in present]))
        out.paths.append(_norm(base / r[icol]))
        out.captions.append([cap])
        out.groups.append([cap])
        out.labels.append(_label_of(r[icol]))
    return out


def parse_phrases(items: Sequence[str]) -> dict[str, str]:
    """``["riverlake=river or lake", ...]`` -> mapping (from repeated --phrase options)."""
    out: dict[str, str] = {}
    for it in items:
        if "=" not in it:
            raise InvalidArgumentError(f"--phrase expects NAME=WORDS, got {it!r}")
        k, v = it.split("=", 1)
        if not k.strip() or not v.strip():
            raise InvalidArgumentError(f"--phrase expects NAME=WORDS, got {it!r}")
        out[k.strip()] = v.strip()
    return out
