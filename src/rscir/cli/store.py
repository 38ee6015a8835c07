"""`rscir verify` and `rscir repair`: check a store completely, mend what can be mended."""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "verify", help="check every file, checksum, shape, NaN row and the moments of a store",
        description="Check a store without changing it (like `git fsck`): every file's size and "
        "checksum, array shapes, NaN/inf rows, moments recomputed from the embeddings, item ids, "
        "folders the state does not list. Exits 1 when something is wrong, naming what and "
        "what to do.")
    p.add_argument("store", help="store directory or postgresql://... URI")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser(
        "repair", help="rebuild what can be rebuilt in a damaged store, set the rest aside",
        description="Restore the manifest from its copy, rebuild the state from intact segments, "
        "recompute wrong moments, and move damaged or unlisted segments to quarantine/ (with a "
        "note). Items of quarantined segments are embedded again by the next `rscir index`.")
    p.add_argument("store", help="store directory or postgresql://... URI")
    p.add_argument("--purge", action="store_true",
                   help="also delete what quarantine/ holds (cannot be undone)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_repair)


def cmd_verify(a: argparse.Namespace) -> int:
    from ..stores.uri import store_class

    rep = store_class(a.store).verify_at(a.store)
    print(json.dumps(rep.to_dict(), indent=1) if a.json else rep.summary())
    return 0 if rep.ok else 1


def cmd_repair(a: argparse.Namespace) -> int:
    from ..stores.uri import store_class

    rep = store_class(a.store).repair_at(a.store, purge=a.purge)
    print(json.dumps(rep.to_dict(), indent=1) if a.json else rep.summary())
    return 0
