"""The search planners (pure): the grid protocol and the adaptive parabolic search."""

import math

import pytest

from neon_ray.search import BASE, AdaptivePlanner, GridPlanner, Point, parse_range


def bowl(p: Point) -> float:
    """A unimodal, locally quadratic FID surface with its minimum at w=1.3, γ=2."""
    return 3 + 0.8 * (p.w - 1.3) ** 2 + 0.5 * (p.guidance - 2) ** 2


def drive(planner, fid=bowl, fail=()):
    n = 0
    while (points := planner.propose()) is not None:
        assert points, "planner waits with nothing pending"
        for p in points:
            planner.observe(p, None if p in fail else fid(p))
            n += 1
    return n


def test_grid_finds_minimum_and_stops_lines_early():
    planner = GridPlanner(snapshots=["s1"], gammas=[1.5, 2.0, 2.5, 3.0], w_lo=0, w_hi=3, w_points=13, batch=2)
    n = drive(planner)
    best, fid = planner.best()
    assert abs(best.w - 1.3) <= 0.125 and best.guidance == 2.0
    assert n < 4 * 13 + 4  # the margin rule cut some lines short
    assert planner.best_base()[0] == Point(BASE, 0.0, 2.0)


def test_adaptive_matches_grid_with_half_the_evaluations():
    gammas = [1.5, 2.0, 2.5, 3.0]
    grid, adaptive = (GridPlanner(snapshots=["s1"], gammas=gammas, w_lo=0, w_hi=3, w_points=13),
                      AdaptivePlanner(snapshots=["s1"], gammas=gammas, w_lo=0, w_hi=3))
    n_grid, n_adaptive = drive(grid), drive(adaptive)
    assert n_adaptive <= n_grid / 2
    assert adaptive.best()[1] <= grid.best()[1] * 1.02
    assert abs(adaptive.best()[0].w - 1.3) < 0.05


def test_base_point_is_shared_between_snapshots_and_failures_are_skipped():
    planner = AdaptivePlanner(snapshots=["a", "b"], gammas=[2.0], w_lo=0, w_hi=3)
    failed = Point.make("a", 1.5, 2.0)
    drive(planner, fail={failed})
    assert sum(p.snapshot == BASE for p in planner.results) == 1
    assert planner.results[failed] == math.inf and planner.best()[0] != failed


@pytest.mark.parametrize("text, message", [("3:1", "inverted"), ("1:1", "empty"), ("a:b", "expected LO:HI")])
def test_bad_ranges(text, message):
    with pytest.raises(ValueError, match=message):
        parse_range(text, "w")
    assert parse_range("0:3", "w") == (0.0, 3.0)
