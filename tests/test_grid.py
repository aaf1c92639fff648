import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from arrag.retrieval.grid import Grid, Neighbourhood


def test_paper_l_neighbourhood_is_up_left_up_up_right_left():
    assert Neighbourhood(hops=1).offsets == ((-1, -1), (-1, 0), (-1, 1), (0, -1))


def test_two_hop_window_is_the_causal_half_of_a_5x5_window():
    offsets = Neighbourhood(hops=2).offsets
    assert len(offsets) == 2 * 5 + 2
    assert offsets[-2:] == ((0, -2), (0, -1))


def test_neighbour_indices_at_corners_and_borders():
    grid = Grid(3, 4)  # raster indices: row 0 = 0..3, row 1 = 4..7, row 2 = 8..11
    table = Neighbourhood().indices(grid)
    expected = {
        0: [-1, -1, -1, -1],  # top-left corner: nothing before it
        3: [-1, -1, -1, 2],  # top-right: only left
        4: [-1, 0, 1, -1],  # left border: no up-left, no left
        5: [0, 1, 2, 4],  # interior
        7: [2, 3, -1, 6],  # right border: no up-right
        11: [6, 7, -1, 10],  # bottom-right corner
    }
    for position, neighbours in expected.items():
        assert table[position].tolist() == neighbours, position


def test_eligible_positions_skip_and_zero_padding():
    grid = Grid(24, 24)
    assert len(Neighbourhood(1, "skip").eligible(grid)) == 506  # the paper's 23 × 22
    assert Neighbourhood(1, "zero").eligible(grid).tolist() == list(range(1, 576))
    assert len(Neighbourhood(2, "skip").eligible(grid)) == 22 * 20


def test_grid_index_round_trip_and_validation():
    grid = Grid(5, 7)
    assert all(grid.index(*grid.cell(i)) == i for i in range(grid.size))
    with pytest.raises(ValueError, match="at least one row"):
        Grid(0, 3)
    with pytest.raises(ValueError, match="hops"):
        Neighbourhood(hops=0)
    with pytest.raises(ValueError, match="missing"):
        Neighbourhood(missing="pad")  # type: ignore[arg-type]


@given(st.integers(1, 9), st.integers(1, 9), st.integers(1, 3), st.sampled_from(["skip", "zero"]))
def test_neighbourhoods_are_causal(rows, cols, hops, missing):
    grid, neighbourhood = Grid(rows, cols), Neighbourhood(hops, missing)
    table = neighbourhood.indices(grid)
    positions = np.arange(grid.size)[:, None]
    assert ((table < positions) | (table == -1)).all()  # only cells generated before the position
    for position in neighbourhood.eligible(grid):
        if missing == "skip":
            assert (table[position] >= 0).all()
        else:
            assert (table[position] >= 0).any()
