"""Search strategies of the Postgres store: the SQL scan and HNSW candidate rounds.

They have the directory store's semantics (the same top-k ids and scores): WeiCom normalization
is exact from the moments (μ = Σx/n, unbiased variance qᵀΣq, see :mod:`rscir.moments`).

* ``brute`` / ``exact-stream`` — the SQL scan: similarities of every qualifying item in SQL
  (float32), then every item that can be in the top k given SQL's rounding is re-scored here.
* ``ann`` — candidates from the HNSW index (iterative scans, so filtered queries still fill k
  rows), re-scored exactly in numpy with :func:`rscir.scoring.fuse`, in growing rounds until a
  bound proves that no unseen item can enter the top k (else the scan answers). That proof is
  exact up to the index's recall; docs/postgres.md says what was measured.
* ``auto`` — the scan when at most ``SearchParams.exact_below`` items qualify, HNSW above.

Each query borrows one pooled connection and reads in one REPEATABLE READ snapshot, so items and
moments agree even while another process is indexing; all its λ share that snapshot (and the
similarities that do not depend on λ).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from ..errors import QueryError
from ..moments import ArchiveMoments, Moments
from ..scoring import QueryStats, fuse, norm_cdf
from ..stores.filters import ItemFilter
from ..stores.postgres.pool import db_errors, sql
from ..stores.postgres.store import PostgresStore
from ..stores.postgres.wire import unpack, vec_literal
from .strategy import ComposedQuery, SearchStrategy, TopK

_F32_EPS = 2.0**-24  # float32 unit roundoff: pgvector and BLAS sum products in float32
_PHI_MAX = 0.3989422804014327  # max of the standard normal density, 1/sqrt(2*pi)


@dataclass
class CandidateStats:
    """How one query was answered: candidate rounds and whether an exact scan was needed."""

    rounds: int = 0
    candidates: int = 0
    exact_scan: bool = False


def _where_sql(cur: Any, schema: str, where: ItemFilter | None, exclude_id: int | None,
               ) -> tuple[str, list[Any]]:
    """The SQL ``WHERE`` of a filter. Areas are pre-selected by the bounds columns in SQL, then
    tested exactly (shapely) on those candidates, which become an id list."""
    conds: list[str] = []
    params: list[Any] = []
    if exclude_id is not None:
        conds.append("id <> %s")
        params.append(int(exclude_id))
    if where is None or where.is_empty():
        return ("WHERE " + " AND ".join(conds)) if conds else "", params
    if where.labels:
        if where.all_labels:
            conds.append("(labels || CASE WHEN label IS NULL THEN ARRAY[]::text[] "
                         "ELSE ARRAY[label] END) @> %s::text[]")
            params.append(list(where.labels))
        else:
            conds.append("(label = ANY(%s) OR labels && %s::text[])")
            params += [list(where.labels), list(where.labels)]
    if where.ids is not None:
        conds.append("id = ANY(%s)")
        params.append(list(where.ids))
    if where.exclude_ids:
        conds.append("NOT (id = ANY(%s))")
        params.append(list(where.exclude_ids))
    if where.start is not None:
        conds.append("datetime >= %s")
        params.append(where.start.ceil("us").to_pydatetime())
    if where.end is not None:
        conds.append("datetime <= %s")
        params.append(where.end.floor("us").to_pydatetime())  # Postgres keeps microseconds
    area = where.area()
    if area is not None:
        ax0, ay0, ax1, ay1 = area.bounds
        box_sql = ("COALESCE(max_lon, lon) >= %s AND COALESCE(min_lon, lon) <= %s AND "
                   "COALESCE(max_lat, lat) >= %s AND COALESCE(min_lat, lat) <= %s")
        pre = " AND ".join([*conds, box_sql])
        cur.execute(sql(f"SELECT id, footprint, COALESCE(min_lon, lon), COALESCE(min_lat, lat), "
                        f"COALESCE(max_lon, lon), COALESCE(max_lat, lat) FROM {{s}}.items "
                        f"WHERE {pre}", schema), [*params, ax0, ax1, ay0, ay1])
        rows = cur.fetchall()
        ids = _area_ids(rows, area)
        conds.append("id = ANY(%s)")
        params.append(ids)
    return ("WHERE " + " AND ".join(conds)) if conds else "", params


def _area_ids(rows: list[tuple[Any, ...]], area: Any) -> list[int]:
    """Ids of the candidate rows whose footprint (or centre point) intersects ``area``."""
    import shapely

    if not rows:
        return []
    ids = np.array([r[0] for r in rows], np.int64)
    fp = [r[1] for r in rows]
    geoms = np.empty(len(rows), dtype=object)
    for i, (f, r) in enumerate(zip(fp, rows, strict=True)):
        geoms[i] = shapely.from_wkb(bytes(f)) if f is not None else shapely.Point(r[2], r[3])
    shapely.prepare(area)
    return ids[shapely.intersects(area, geoms)].tolist()


def _weicom_bound(a_z: float, b_z: float, line: float, lam: float) -> float:
    """max λΦ(zt) + (1−λ)Φ(zi) over zi ≤ A, zt ≤ B, (1−λ)zi + λzt ≤ L.

    The objective grows in both coordinates, so the maximum lies on the line (or at the corner
    (A, B) when that is feasible). On the line its derivative vanishes where φ(zi) = φ(zt), i.e.
    zi = L or zi = L/(1−2λ); those points and the segment's ends are all the candidates."""
    phi = norm_cdf

    def f(zi: float, zt: float) -> float:
        v = phi(np.array([[zt, zi]], np.float64), QueryStats(np.zeros((1, 1)), np.ones((1, 1))))
        return float(lam * v[0, 0] + (1 - lam) * v[0, 1])

    if (1 - lam) * a_z + lam * b_z <= line:
        return f(a_z, b_z)
    lo = (line - lam * b_z) / (1 - lam)  # zt = B here
    hi = a_z
    pts = [lo, hi, line]
    if lam != 0.5:
        pts.append(line / (1 - 2 * lam))
    best = -np.inf
    for zi in pts:
        if lo - 1e-12 <= zi <= hi + 1e-12:
            zt = min(b_z, (line - (1 - lam) * zi) / lam)
            best = max(best, f(min(zi, a_z), zt))
    return best


def _fuse(method: str, si: np.ndarray | None, st: np.ndarray | None, lam: float,
          stats: tuple[QueryStats | None, QueryStats | None]) -> np.ndarray:
    if method == "weicom":
        return fuse(method, si, st, lam, img_stats=stats[0], txt_stats=stats[1])
    return fuse(method, si, st, lam)


def _fused_err(method: str, lam: float, si: np.ndarray | None, st: np.ndarray | None,
               errs: list[float], stats: tuple[QueryStats | None, QueryStats | None]) -> float:
    """Bound on how far a fused score can move when each similarity moves by its ``errs``
    entry (image first, then text, for those given), plus float32 rounding of the fusion."""
    it = iter(errs)
    ei = next(it) if si is not None else 0.0
    et = next(it) if st is not None else 0.0
    if method == "image":
        e = ei
    elif method == "text":
        e = et
    elif method == "sum":
        e = ei + et
    elif method == "average":
        e = (ei + et) / 2
    elif method == "product":
        ai = float(np.abs(si).max()) if si is not None and si.size else 0.0
        at = float(np.abs(st).max()) if st is not None and st.size else 0.0
        e = ai * et + at * ei + ei * et
    else:  # weicom: Φ is _PHI_MAX-Lipschitz, z moves by err / std
        sd_i = float(np.where(stats[0].std > 0, stats[0].std, 1.0)[0, 0]) if stats[0] else 1.0
        sd_t = float(np.where(stats[1].std > 0, stats[1].std, 1.0)[0, 0]) if stats[1] else 1.0
        wi, wt = (1.0, 0.0) if lam == 0.0 else (0.0, 1.0) if lam == 1.0 else (1 - lam, lam)
        e = _PHI_MAX * (wi * ei / sd_i + wt * et / sd_t)
    return e + 1e-6


def _top(scores: np.ndarray, k: int) -> np.ndarray:
    """Positions of the best k (ids ascending beforehand, so equal scores keep the lower id)."""
    return np.lexsort((np.arange(len(scores)), -scores))[:k]




class _PgStrategy(SearchStrategy):
    """The shared frame; ``mode`` is "exact", "index" or "auto" (see module docstring)."""

    mode: ClassVar[str]
    store: PostgresStore

    def search(self, query: ComposedQuery, lams: Sequence[float], k: int,
               where: ItemFilter | None = None) -> list[TopK]:
        per_query = [self._search_one(
            None if query.img is None else query.img[i],
            None if query.txt is None else query.txt[i],
            query.method, lams, k, int(query.exclude_ids[i]), where) for i in range(query.nq)]
        out = []
        for j in range(len(lams)):
            width = max([len(r[j][0]) for r in per_query] + [0])
            t = TopK.empty(query.nq, width)
            si = np.full((query.nq, width), np.nan) if query.img is not None else None
            st = np.full((query.nq, width), np.nan) if query.txt is not None else None
            for i, r in enumerate(per_query):
                ids, scores, a, b, _ = r[j]
                t.ids[i, : len(ids)] = ids
                t.scores[i, : len(ids)] = scores
                if si is not None and a is not None:
                    si[i, : len(ids)] = a
                if st is not None and b is not None:
                    st[i, : len(ids)] = b
            t.sim_image, t.sim_text = si, st
            out.append(t)
        return out

    def search_with_stats(self, img: np.ndarray | None, txt: np.ndarray | None, method: str,
                          lams: Sequence[float], k: int, exclude_id: int = -1,
                          where: ItemFilter | None = None,
                          ) -> list[tuple[np.ndarray, np.ndarray, CandidateStats]]:
        """One query's (ids, scores, how it was answered) per λ (for tests and benchmarks)."""
        q = ComposedQuery.make(img, txt, method, [exclude_id])
        res = self._search_one(None if q.img is None else q.img[0],
                               None if q.txt is None else q.txt[0], method, lams, k,
                               exclude_id, where)
        return [(ids, scores, cs) for ids, scores, _, _, cs in res]

    # ----------------------------------------------------------------- snapshot helpers
    def _snapshot_moments(self, cur: Any) -> tuple[int, ArchiveMoments | None, float]:
        """(n, moments, max_norm) for the snapshot ``cur`` reads (moments cached per generation)."""
        s = self.store.schema
        gen, max_norm, n = cur.execute(sql(
            "SELECT m.generation, m.max_norm, mo.n FROM {s}.meta m, {s}.moments mo", s)).fetchone()
        d = self.store.dim

        def load() -> Moments:
            row = cur.execute(sql("SELECT n, sum, sumsq FROM {s}.moments", s)).fetchone()
            return Moments(int(row[0]), unpack(row[1], (d,)), unpack(row[2], (d, d)))

        return int(n), self.moments.get(int(gen), load), float(max_norm)

    def _fetch(self, cur: Any, direction: np.ndarray, limit: int, where: str,
               params: list[Any]) -> tuple[np.ndarray, np.ndarray]:
        """(ids, embeddings) of the ``limit`` items best by inner product with ``direction``
        (cast to the column type), from the HNSW index when the planner picks it."""
        vt = f"{self.store.vec_type}({self.store.dim})"
        cur.execute(sql(f"SELECT id, embedding FROM {{s}}.items {where} ORDER BY embedding <#> "
                        f"%s::{vt} LIMIT %s", self.store.schema),
                    [*params, vec_literal(direction), int(limit)])
        rows = cur.fetchall()
        if not rows:
            return np.zeros(0, np.int64), np.zeros((0, self.store.dim), np.float32)
        return (np.array([r[0] for r in rows], np.int64),
                np.stack([r[1] for r in rows]).astype(np.float32))

    def _fetch_ids(self, cur: Any, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(ids ascending, embeddings) of these items."""
        cur.execute(sql("SELECT id, embedding FROM {s}.items WHERE id = ANY(%s) ORDER BY id",
                        self.store.schema), (ids.tolist(),))
        got = cur.fetchall()
        return (np.array([r[0] for r in got], np.int64),
                np.stack([r[1] for r in got]).astype(np.float32))

    def _dot_err(self, v: np.ndarray, max_norm: float) -> float:
        """Bound on |v·x − (v·x as the index computed it)| for stored ‖x‖ ≤ ``max_norm``: the
        query is cast to the column type (fp16 for halfvec) and pgvector sums in float32."""
        v = np.asarray(v, np.float64)
        nv = float(np.linalg.norm(v))
        unit = v / max(nv, 1e-30)
        q = unit.astype(np.float16 if self.store.vec_type == "halfvec" else np.float32)
        cast = float(np.linalg.norm(unit - q.astype(np.float64)))
        return nv * max_norm * (cast + 2 * self.store.dim * _F32_EPS) * 1.01 + 1e-7

    # ----------------------------------------------------------------- search
    def _search_one(
        self, qi: np.ndarray | None, qt: np.ndarray | None, method: str,
        lams: Sequence[float], k: int, exclude_id: int, where: ItemFilter | None,
    ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None,
                    CandidateStats]]:
        """Top-k (ids, scores, image sims, text sims, stats) per λ for one query, all from one
        database snapshot; fewer than k rows only when fewer than k items pass ``where``."""
        p = self.params
        out: list[tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None,
                        CandidateStats]] = []
        with db_errors(self.store.uri), self.store.pool.connection() as conn:
            cur = conn.cursor(binary=True)  # the pool's connections read in REPEATABLE READ
            wsql, wparams = _where_sql(cur, self.store.schema, where,
                                       exclude_id if exclude_id >= 0 else None)
            n, am, max_norm = self._snapshot_moments(cur)
            if n == 0 or k < 1:
                z = np.zeros(0)
                return [(np.zeros(0, np.int64), z, None, None, CandidateStats()) for _ in lams]
            stats: tuple[QueryStats | None, QueryStats | None] = (None, None)
            if method == "weicom":
                if am is None:
                    raise QueryError("WeiCom normalization needs an archive of at least 2 items")
                stats = (am.query_stats(qi[None]) if qi is not None else None,
                         am.query_stats(qt[None]) if qt is not None else None)
            exact = self.mode == "exact" or (
                self.mode == "auto"
                and self._qualifying(cur, n, where, wsql, wparams) <= p.exact_below)
            if not exact:
                cur.execute("SET LOCAL hnsw.iterative_scan = relaxed_order")
                cur.execute(f"SET LOCAL hnsw.ef_search = {min(1000, max(40, int(p.ef_search)))}")
                cur.execute(f"SET LOCAL hnsw.max_scan_tuples = {max(20000, 8 * p.max_candidates)}")
                if self.mode == "index":
                    cur.execute("SET LOCAL enable_seqscan = off")
            memo: dict[Any, Any] = {}  # what does not depend on λ: the scan, the fixed lists
            for lam in lams:
                if exact:
                    cs = CandidateStats(exact_scan=True)
                    ids, x = self._exact_scan(cur, qi, qt, method, lam, k, stats, max_norm,
                                              wsql, wparams, cs, memo)
                else:
                    ids, x, cs = self._rounds(cur, qi, qt, method, lam, k, stats, max_norm, wsql,
                                              wparams, memo)
                scores, si, st = self._rescore(x, qi, qt, method, lam, stats)
                order = _top(scores, k)
                out.append((ids[order], scores[order], None if si is None else si[order],
                            None if st is None else st[order], cs))
        return out

    def _qualifying(self, cur: Any, n: int, where: ItemFilter | None, wsql: str,
                    wparams: list[Any]) -> int:
        """Items that pass the filter, counted up to ``exact_below + 1`` (enough to decide)."""
        if where is None or where.is_empty():
            return n  # (less the excluded query item, which does not matter here)
        row = cur.execute(sql(f"SELECT count(*) FROM (SELECT 1 FROM {{s}}.items {wsql} "
                              "LIMIT %s) AS t", self.store.schema),
                          [*wparams, int(self.params.exact_below) + 1]).fetchone()
        return int(row[0])

    def _exact_scan(self, cur: Any, qi: np.ndarray | None, qt: np.ndarray | None, method: str,
                    lam: float, k: int, stats: tuple[QueryStats | None, QueryStats | None],
                    max_norm: float, where: str, params: list[Any],
                    cs: CandidateStats, memo: dict[Any, Any]) -> tuple[np.ndarray, np.ndarray]:
        """Every qualifying item's similarities, computed in SQL (float32) once per query (kept
        in ``memo`` for its other λ), fused here; the items that can be in the top k given the
        rounding bound ``delta`` are fetched for re-scoring.

        Why a margin: SQL and numpy sum in different orders. With |f_sql − f| ≤ δ, any item of
        the exact top k has f_sql ≥ (k-th best f_sql) − 2δ, so that set provably holds it."""
        d = self.store.dim
        if "scan" not in memo:
            cols, qparams, errs = [], [], []
            for v in (qi, qt):
                if v is not None:
                    cols.append(f"-(embedding::vector({d}) <#> %s::vector({d}))")
                    qparams.append(vec_literal(v))
                    errs.append(float(np.linalg.norm(v)) * max_norm * 2 * d * _F32_EPS * 1.01
                                + 1e-7)
            cur.execute(sql(f"SELECT id, {', '.join(cols)} FROM {{s}}.items {where}",
                            self.store.schema), [*qparams, *params])
            arr = np.array(cur.fetchall(), np.float64).reshape(-1, 1 + len(cols))
            sims = iter(arr[:, 1:].T)
            memo["scan"] = (arr[:, 0].astype(np.int64),
                            next(sims)[None] if qi is not None else None,
                            next(sims)[None] if qt is not None else None, errs)
        ids, si, st, errs = memo["scan"]
        cs.candidates = len(ids)
        if not len(ids):
            return np.zeros(0, np.int64), np.zeros((0, d), np.float32)
        f = np.asarray(_fuse(method, si, st, lam, stats), np.float64)[0]
        delta = _fused_err(method, lam, si, st, errs, stats)
        kth = np.partition(f, len(f) - min(k, len(f)))[len(f) - min(k, len(f))]
        keep = ids[f >= kth - 2 * delta]
        return self._fetch_ids(cur, keep)

    def _rounds(self, cur: Any, qi: np.ndarray | None, qt: np.ndarray | None, method: str,
                lam: float, k: int, stats: tuple[QueryStats | None, QueryStats | None],
                max_norm: float, wsql: str, wparams: list[Any], memo: dict[Any, Any],
                ) -> tuple[np.ndarray, np.ndarray, CandidateStats]:
        """Candidates from the index in growing rounds until a bound proves that no item outside
        them can enter the top k (exact up to the index's recall); else an exact scan."""
        cs = CandidateStats()
        si_st, ti_st = stats
        # the directions whose top lists hold the answer
        dirs: list[np.ndarray]
        if method == "product":  # both factors may be negative: no single direction bounds it
            dirs = []
        elif method == "image" or (method == "weicom" and lam == 0.0):
            dirs = [qi]  # type: ignore[list-item]  # the method has an image
        elif method == "text" or (method == "weicom" and lam == 1.0):
            dirs = [qt]  # type: ignore[list-item]  # the method has a text
        elif method in ("sum", "average"):
            dirs = [qi + qt]  # type: ignore[operator]  # both are set for these methods
        else:  # weicom, 0 < λ < 1: the image list, the text list and the fused linear direction
            assert qi is not None and qt is not None and si_st is not None and ti_st is not None
            sd_i = float(np.where(si_st.std > 0, si_st.std, 1.0)[0, 0])
            sd_t = float(np.where(ti_st.std > 0, ti_st.std, 1.0)[0, 0])
            w = (1 - lam) * qi / sd_i + lam * qt / sd_t
            dirs = [qi, qt, w.astype(np.float32)]
        limit = max(k + 16, 2 * k, 32)
        while dirs:
            cs.rounds += 1
            lists = []
            for v in dirs:
                unit = v / max(float(np.linalg.norm(v)), 1e-12)
                key = (unit.tobytes(), limit)  # the image and text lists serve every λ
                if key not in memo:
                    memo[key] = self._fetch(cur, unit, limit, wsql, wparams)
                ids, x = memo[key]
                lists.append((ids, x, v))
            ids = np.concatenate([lst[0] for lst in lists])
            x = np.concatenate([lst[1] for lst in lists])
            ids, first = np.unique(ids, return_index=True)  # sorted by id: ties → lower id
            x = x[first]
            cs.candidates = len(ids)
            if any(len(lst[0]) < limit for lst in lists):
                break  # a list ran dry (filters, scan limit): the exact scan decides
            scores = self._rescore(x, qi, qt, method, lam, stats)[0]
            kth = np.sort(scores)[::-1][k - 1] if len(scores) >= k else -np.inf
            if kth > self._unseen_bound(lists, qi, qt, method, lam, stats, max_norm):
                return ids, x, cs
            if limit >= self.params.max_candidates:
                break
            limit = min(limit * 4, self.params.max_candidates)
        cs.exact_scan = True
        ids, x = self._exact_scan(cur, qi, qt, method, lam, k, stats, max_norm, wsql, wparams, cs,
                                  memo)
        return ids, x, cs

    def _rescore(self, x: np.ndarray, qi: np.ndarray | None, qt: np.ndarray | None, method: str,
                 lam: float, stats: tuple[QueryStats | None, QueryStats | None],
                 ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """Scores exactly as the directory store's strategies compute them (float32
        similarities of the stored values, fused with the archive's statistics), with the
        image and text similarities (float64 dot products, as reported for hits)."""
        if not len(x):
            return np.zeros(0), None, None
        si = (qi[None] @ x.T) if qi is not None else None
        st = (qt[None] @ x.T) if qt is not None else None
        scores = np.asarray(_fuse(method, si, st, lam, stats), np.float64)[0]
        x64 = x.astype(np.float64)
        return (scores,
                None if qi is None else x64 @ qi.astype(np.float64),
                None if qt is None else x64 @ qt.astype(np.float64))

    def _unseen_bound(self, lists: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
                      qi: np.ndarray | None, qt: np.ndarray | None, method: str, lam: float,
                      stats: tuple[QueryStats | None, QueryStats | None],
                      max_norm: float) -> float:
        """The best score any item outside all candidate lists can have: each list is the top
        of its direction v, so such an item has v·x ≤ min over the list (+ rounding)."""
        th = [float((x @ v).min()) + 2 * self._dot_err(v, max_norm) for _, x, v in lists]
        if len(th) == 1:
            if method == "sum":
                return th[0] + 1e-6
            if method == "average":
                return th[0] / 2 + 1e-6
            a = np.array([[th[0]]], np.float64)
            return float(_fuse(method, a, a, lam, stats)[0, 0]) + 1e-6
        si_st, ti_st = stats
        assert si_st is not None and ti_st is not None
        mi, sdi = float(si_st.mean[0, 0]), float(np.where(si_st.std > 0, si_st.std, 1.0)[0, 0])
        mt, sdt = float(ti_st.mean[0, 0]), float(np.where(ti_st.std > 0, ti_st.std, 1.0)[0, 0])
        a_z, b_z = (th[0] - mi) / sdi, (th[1] - mt) / sdt
        line = th[2] - (1 - lam) * mi / sdi - lam * mt / sdt
        return _weicom_bound(a_z, b_z, line, lam) + 1e-6


class SqlScan(_PgStrategy):
    """Every qualifying item scored (similarities in SQL, the best re-scored exactly)."""

    name: ClassVar[str] = "brute"
    mode: ClassVar[str] = "exact"


class SqlScanStream(SqlScan):
    """``exact-stream`` on Postgres: the exact SQL scan (there are no sorted streams to read)."""

    name: ClassVar[str] = "exact-stream"


class HnswRounds(_PgStrategy):
    """Candidates from the HNSW index in growing rounds, proven or else scanned."""

    name: ClassVar[str] = "ann"
    mode: ClassVar[str] = "index"


class PgAuto(_PgStrategy):
    """The scan for small or selective queries, HNSW rounds above."""

    name: ClassVar[str] = "auto"
    mode: ClassVar[str] = "auto"


STRATEGIES: dict[str, type[SearchStrategy]] = {
    s.name: s for s in (PgAuto, SqlScan, SqlScanStream, HnswRounds)
}
