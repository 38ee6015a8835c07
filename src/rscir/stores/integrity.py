"""What a store's records promise and how to check them: checksums, verify reports, quarantine.

``git fsck`` and SQLite's ``PRAGMA integrity_check`` are the models: a store records, for every
file it writes, its size and SHA-256; opening checks what is cheap (sizes, shapes, counts),
``rscir verify`` checks everything, and nothing is ever deleted on doubt — files no valid state
references are moved to ``quarantine/`` with a note saying why.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class FileRecord:
    """Size and SHA-256 of one file, as written."""

    bytes: int
    sha256: str

    @classmethod
    def of(cls, path: Path) -> FileRecord:
        return cls(path.stat().st_size, sha256_file(path))


@dataclass
class Problem:
    """One thing ``verify`` found: where, what, and what to do."""

    where: str
    what: str
    fix: str = ""

    def line(self) -> str:
        return f"{self.where}: {self.what}" + (f" ({self.fix})" if self.fix else "")


@dataclass
class VerifyReport:
    """The outcome of checking a whole store."""

    store: str
    items: int = 0
    segments: int = 0
    checked_bytes: int = 0
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ok"] = self.ok
        return d

    def summary(self) -> str:
        head = (f"{self.store}: {'ok' if self.ok else f'{len(self.problems)} problem(s)'} — "
                f"{self.items} items in {self.segments} segment(s), "
                f"{self.checked_bytes / 1e6:.1f} MB checked")
        lines = [head, *(f"  problem: {p.line()}" for p in self.problems),
                 *(f"  note: {n}" for n in self.notes)]
        return "\n".join(lines)


@dataclass
class RepairReport:
    """What ``repair`` changed (nothing is deleted unless ``purge`` was asked)."""

    store: str
    actions: list[str] = field(default_factory=list)
    quarantined: list[str] = field(default_factory=list)
    purged: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        if not (self.actions or self.quarantined or self.purged):
            return f"{self.store}: nothing to repair"
        return "\n".join([f"{self.store}: repaired", *(f"  {a}" for a in self.actions),
                          *(f"  quarantined {q}" for q in self.quarantined),
                          *(f"  purged {q}" for q in self.purged)])


def quarantine(store_dir: Path, victim: Path, why: str) -> Path:
    """Move ``victim`` (a file or folder of the store) into ``quarantine/`` with a note."""
    qdir = store_dir / "quarantine"
    qdir.mkdir(exist_ok=True)
    dest = qdir / f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}-{victim.name.lstrip('.')}"
    os.rename(victim, dest)
    note = {"from": str(victim.relative_to(store_dir)), "why": why, "when": time.time(),
            "pid": os.getpid()}
    (qdir / f"{dest.name}.note.json").write_text(json.dumps(note, indent=1))
    return dest


def purge_quarantine(store_dir: Path) -> list[str]:
    """Delete what quarantine/ holds (only on the user's explicit request)."""
    qdir = store_dir / "quarantine"
    gone = []
    for p in sorted(qdir.iterdir()) if qdir.is_dir() else []:
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink()
        gone.append(p.name)
    return gone
