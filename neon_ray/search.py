"""Where to evaluate next: the (snapshot, w, γ) search as pure planners.

A planner proposes points, is told their FID, and eventually finishes. It
knows nothing of Ray; ``sweep.py`` runs its points as Ray Tune trials.

- :class:`GridPlanner` — the paper's protocol: per (snapshot, γ) a coarse w grid
  walked upwards in batches, a line stopped once FID rises past its best by a
  relative ``margin`` (FID(w) is unimodal), then a refinement around the best
  point in w and γ.
- :class:`AdaptivePlanner` — uses that FID(w) is unimodal and locally quadratic:
  per line three points (lo, middle, hi), then successive parabolic
  interpolation through the best three (a safeguarded step of Brent's method),
  stopping when the vertex is within ``tol`` of a point already seen. About five
  evaluations per line instead of the grid's nine to a dozen.

w = 0 is θ_r whatever the snapshot, so it is one point per γ (snapshot "base").
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

BASE = "base"


@dataclass(frozen=True, order=True)
class Point:
    snapshot: str
    w: float
    guidance: float

    @staticmethod
    def make(snapshot: str, w: float, guidance: float) -> "Point":
        w, guidance = round(float(w), 6), round(float(guidance), 6)
        return Point(BASE if w == 0.0 else snapshot, w, guidance)


def parse_range(text: str, name: str) -> tuple[float, float]:
    """``"LO:HI"`` (or one number) → (lo, hi); refuses empty or inverted ranges."""
    parts = str(text).split(":")
    try:
        lo, hi = (float(parts[0]), float(parts[-1])) if len(parts) in (1, 2) else (None, None)
    except ValueError:
        lo = hi = None
    if lo is None or not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"{name}: expected LO:HI, got {text!r}")
    if hi < lo:
        raise ValueError(f"{name}: inverted range {text!r} (LO must be <= HI)")
    if len(parts) == 2 and hi == lo:
        raise ValueError(f"{name}: empty range {text!r}")
    return lo, hi


def linspace(lo: float, hi: float, n: int) -> list[float]:
    return [lo] if n <= 1 or hi == lo else [lo + (hi - lo) * i / (n - 1) for i in range(n)]


@dataclass
class _Planner:
    snapshots: list[str]
    gammas: list[float]
    w_lo: float
    w_hi: float
    results: dict[Point, float] = field(default_factory=dict)   # FID (inf when failed)
    pending: set[Point] = field(default_factory=set)

    def observe(self, point: Point, fid: float | None) -> None:
        self.pending.discard(point)
        self.results[point] = math.inf if fid is None or not math.isfinite(fid) else float(fid)

    def _fresh(self, points: list[Point]) -> list[Point]:
        out = []
        for p in points:
            if p not in self.results and p not in self.pending and p not in out:
                out.append(p)
        self.pending.update(out)
        return out

    def line(self, snapshot: str, guidance: float) -> dict[float, float]:
        """Observed {w: FID} along one (snapshot, γ) line, w = 0 included."""
        return {p.w: f for p, f in self.results.items()
                if p.guidance == round(guidance, 6) and p.snapshot in (snapshot, BASE)}

    def best(self) -> tuple[Point, float]:
        point = min(self.results, key=lambda p: (self.results[p], p))
        return point, self.results[point]

    def best_base(self) -> tuple[Point, float]:
        """The best w = 0 point (the base model at its own best γ)."""
        base = {p: f for p, f in self.results.items() if p.snapshot == BASE}
        point = min(base, key=lambda p: (base[p], p))
        return point, base[point]


@dataclass
class GridPlanner(_Planner):
    w_points: int = 7
    margin: float = 0.05          # stop a line when FID > best·(1 + margin) past the best
    batch: int = 2                # points per line proposed at once (parallel trials)
    refine: bool = True
    _cursor: dict[tuple[str, float], int] = field(default_factory=dict)
    _stopped: set[tuple[str, float]] = field(default_factory=set)
    _refined: bool = False

    def _coarse(self) -> list[float]:
        grid = linspace(self.w_lo, self.w_hi, self.w_points)
        return sorted(set([0.0] + grid) if self.w_lo <= 0.0 <= self.w_hi else grid)

    def _line_done(self, key: tuple[str, float]) -> bool:
        snap, g = key
        obs = self.line(snap, g)
        grid = self._coarse()
        if key in self._stopped or self._cursor.get(key, 0) >= len(grid):
            return True
        seen = [(w, obs[w]) for w in grid[: self._cursor.get(key, 0)] if w in obs]
        if seen:
            w_best, f_best = min(seen, key=lambda t: t[1])
            if any(w > w_best and f > f_best * (1 + self.margin) for w, f in seen):
                self._stopped.add(key)
                return True
        return False

    def propose(self) -> list[Point] | None:
        """Points to evaluate now; [] = wait for results; None = finished."""
        grid = self._coarse()
        out: list[Point] = []
        lines = [(s, g) for s in self.snapshots for g in self.gammas]
        for key in lines:
            if self._line_done(key):
                continue
            start = self._cursor.get(key, 0)
            batch_points = [Point.make(key[0], w, key[1]) for w in grid[start:start + self.batch]]
            if any(p in self.pending for p in self._line_points(key, grid[:start])):
                continue  # wait for this line's previous batch before walking on
            self._cursor[key] = start + self.batch
            out += batch_points
        out = self._fresh(out)
        if out or self.pending:
            return out
        if self.refine and not self._refined and self.results:
            self._refined = True
            out = self._fresh(self._refinement(grid))
            if out:
                return out
        return None

    def _line_points(self, key: tuple[str, float], ws: list[float]) -> list[Point]:
        return [Point.make(key[0], w, key[1]) for w in ws]

    def _refinement(self, grid: list[float]) -> list[Point]:
        best, _ = self.best()
        step = (grid[1] - grid[0]) if len(grid) > 1 else 0.0
        snap = best.snapshot if best.snapshot != BASE else self.snapshots[0]
        ws = [best.w + d for d in (-step / 2, step / 2) if self.w_lo <= best.w + d <= self.w_hi and step]
        g_step = (self.gammas[1] - self.gammas[0]) if len(self.gammas) > 1 else 0.0
        gs = [best.guidance + d for d in (-g_step / 2, g_step / 2) if g_step and
              min(self.gammas) <= best.guidance + d <= max(self.gammas)]
        return [Point.make(snap, w, best.guidance) for w in ws] + [Point.make(snap, best.w, g) for g in gs]


@dataclass
class AdaptivePlanner(_Planner):
    max_evals_per_line: int = 5
    tol: float = 0.05             # stop when the parabola's vertex is this close (in w) to a seen point

    def _vertex(self, obs: dict[float, float]) -> float | None:
        """Vertex of the parabola through the best point and its two neighbours (bracketed)."""
        ws = sorted(w for w in obs if math.isfinite(obs[w]))
        if len(ws) < 3:
            return None
        i = min(range(len(ws)), key=lambda j: obs[ws[j]])
        i = min(max(i, 1), len(ws) - 2)
        a, b, c = ws[i - 1], ws[i], ws[i + 1]
        fa, fb, fc = obs[a], obs[b], obs[c]
        den = (b - a) * (fb - fc) - (b - c) * (fb - fa)
        if den == 0:
            return None
        v = b - 0.5 * ((b - a) ** 2 * (fb - fc) - (b - c) ** 2 * (fb - fa)) / den
        if not (a < v < c):     # safeguard: the minimum is bracketed by [a, c] (unimodal)
            best = min((a, b, c), key=lambda w: obs[w])
            v = (a + best) / 2 if best != c else (best + c) / 2
        return min(max(v, self.w_lo), self.w_hi)

    def propose(self) -> list[Point] | None:
        """Points to evaluate now; [] = wait for results; None = finished."""
        out: list[Point] = []
        waiting = False
        mid = (self.w_lo + self.w_hi) / 2
        for snap in self.snapshots:
            for g in self.gammas:
                obs = self.line(snap, g)
                busy = any(p.guidance == round(g, 6) and p.snapshot in (snap, BASE) for p in self.pending)
                initial = [Point.make(snap, w, g) for w in (self.w_lo, mid, self.w_hi) if round(w, 6) not in obs]
                if initial or busy:
                    out += initial
                    waiting |= busy
                    continue
                if len(obs) >= self.max_evals_per_line:
                    continue
                w_next = self._vertex(obs)
                if w_next is not None and min(abs(w_next - w) for w in obs) >= self.tol:
                    out.append(Point.make(snap, w_next, g))
        out = self._fresh(out)
        if out or waiting or self.pending:
            return out
        return None
