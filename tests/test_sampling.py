import numpy as np
import pytest
import shapely

from mmearth_data.grid import GlobalGrid, GridError
from mmearth_data.sampling import (
    SampleConfig,
    SamplingError,
    allocate,
    primaries,
    sample_plan,
    stratum_counts,
)
from mmearth_data.world import get_world


@pytest.fixture(scope="module")
def plan():
    return sample_plan(SampleConfig(150, seed=3, tile_size=128))


def test_strata_differ_by_at_most_one(plan):
    counts = stratum_counts(plan).to_numpy()
    assert counts.sum() == 150
    assert counts.shape == (14, 4)
    assert counts.max() - counts.min() <= 1


def test_plan_is_deterministic_per_seed(plan):
    again = sample_plan(SampleConfig(150, seed=3, tile_size=128))
    assert again["tile_id"].tolist() == plan["tile_id"].tolist()
    other = sample_plan(SampleConfig(150, seed=4, tile_size=128))
    assert other["tile_id"].tolist() != plan["tile_id"].tolist()


def test_no_two_footprints_overlap_and_ids_are_unique(plan):
    assert plan["tile_id"].is_unique
    geoms = plan.geometry.values
    tree = shapely.STRtree(geoms)
    a, b = tree.query(geoms, predicate="intersects")
    assert np.all(a == b), "two planned tiles overlap"


def test_tile_centre_lies_in_its_biome_and_footprint(plan):
    w = get_world()
    assert np.all(w.biome(plan["lat"], plan["lon"]) == plan["biome"])
    pts = shapely.points(plan["lon"], plan["lat"])
    assert np.all(shapely.contains(plan.geometry.values, pts))


def test_each_primary_has_its_alternates_from_the_same_stratum(plan):
    for _, g in plan.groupby("slot"):
        assert sorted(g["rank"]) == [0, 1, 2]
        assert g["biome"].nunique() == 1 and g["year"].nunique() == 1
    assert sorted(primaries(plan)["slot"]) == list(range(150))


def test_allocate_spreads_a_capped_stratum_over_the_others():
    strata = [(b, 2020) for b in range(1, 5)]
    alloc = allocate(20, strata, {(1, 2020): 2, (2, 2020): 100, (3, 2020): 100, (4, 2020): 100})
    assert alloc[(1, 2020)] == 2 and sum(alloc.values()) == 20
    others = [alloc[s] for s in strata[1:]]
    assert max(others) - min(others) <= 1
    with pytest.raises(SamplingError, match="only 4 tiles fit"):
        allocate(5, strata, dict.fromkeys(strata, 1))


def test_grid_ids_round_trip_and_bad_sizes():
    g = GlobalGrid(64)
    rows, cols = g.cell_of(np.array([45.2, -33.9]), np.array([7.1, -70.6]))
    for r, c in zip(rows, cols, strict=True):
        assert GlobalGrid.parse_id(g.tile_id(int(r), int(c)))[1:] == (r, c)
    with pytest.raises(ValueError, match="not a tile id"):
        GlobalGrid.parse_id("../etc/passwd")
    for bad in (100, 0, 16, 2048):
        with pytest.raises(GridError, match="multiple of 32"):
            GlobalGrid(bad)


@pytest.mark.parametrize("n", [0, -3])
def test_non_positive_tile_counts_are_refused(n):
    with pytest.raises(SamplingError, match="positive"):
        SampleConfig(n)
