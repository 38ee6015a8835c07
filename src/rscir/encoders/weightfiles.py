"""What a weights file is, told from its bytes (never its name), without importing torch, and
exception text in rscir's words (without the advice torch appends)."""

from __future__ import annotations

import os
import re

_TORCH_LEGACY_MAGIC = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"  # torch.save, pre-zip
SAVE_HINT = ("save the weights alone, e.g. torch.save(model.state_dict(), 'weights.pt'), or as "
             "a .safetensors file")


def weights_format(path: str | os.PathLike[str]) -> str:
    """What a weights file is, from its first bytes (never from its name): ``safetensors``,
    ``torch`` (torch.save, zip or legacy), ``pickle`` (any other pickle) or ``unknown``."""
    with open(path, "rb") as f:
        head = f.read(16)
        size = os.fstat(f.fileno()).st_size
    if head[:4] == b"PK\x03\x04" or head.startswith(_TORCH_LEGACY_MAGIC):
        return "torch"
    if len(head) > 8 and head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") <= size - 8:
        return "safetensors"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "pickle"
    return "unknown"


def error_summary(e: BaseException) -> str:
    """An exception's first line, without the advice torch appends about weights_only."""
    text = str(e).strip()
    m = re.search(r"GLOBAL ([\w.]+)", text)  # torch: "Unsupported global: GLOBAL x.y", ...
    if m:
        return f"it refers to the Python object {m.group(1)}"
    m = re.search(r"WeightsUnpickler error: ([^\n]+)", text)
    if not m and text.startswith("Weights only load failed"):
        return "it holds objects that are not tensors"
    line = m.group(1) if m else (text.splitlines() or [type(e).__name__])[0]
    return line.split(". ")[0].strip().rstrip(".")[:160]  # the first sentence: torch's advice
    # that follows ("If you are seeing this error ...", "Please file an issue") is not ours
