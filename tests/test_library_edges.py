"""Edge cases of the library's inputs: rounding of box corners, spacing, weights' precision, direction matrices,
stale temporary files, and the sliding-window baseline's windows."""

from __future__ import annotations

import numpy as np
import pytest

from raps3d import Box, Engine, ImageError, ImageState, InteractiveObject, PromptError
from raps3d.checkpoint import remove_stale_writes
from raps3d.orientation import Reorientation
from raps3d.sliding_window import _starts

from library_fixtures import empty_mask_engine, synthetic_volume


@pytest.fixture(scope="module")
def image():
    return ImageState(empty_mask_engine(), synthetic_volume((40, 70, 90)), (2.5, 0.8, 0.8))


def test_box_corners_go_to_the_voxel_that_holds_them_halves_up(image):
    box = InteractiveObject(image)._check_box((20.5, (50.5, 30.5), (52.5, 40.5)))
    assert (box.z, box.y0, box.x0, box.y1, box.x1) == (21, 51, 31, 53, 41)
    assert Box((21, 51, 31), (22, 54, 42)).contains((20.5, 50.5, 30.5))  # the voxel a point there would take
    # Two boxes of the same size get the same size, whatever the parity of their corners.
    for y0 in (50.5, 51.5):
        b = InteractiveObject(image)._check_box((20, (y0, 30), (y0 + 1, 40)))
        assert b.y1 - b.y0 == 1
    with pytest.raises(PromptError, match="has no area"):
        InteractiveObject(image)._check_box((20, (50.4, 30), (50.49, 40)))


@pytest.mark.parametrize("spacing", [(1.0, np.inf, 1.0), (np.nan, 1.0, 1.0), (0.0, 1.0, 1.0)])
def test_a_spacing_that_is_not_a_finite_positive_length_is_refused(spacing):
    with pytest.raises(ImageError, match="invalid voxel spacing"):
        ImageState(empty_mask_engine(), synthetic_volume((8, 16, 16)), spacing)


def test_an_engine_refuses_half_precision_weights_saying_what_to_do():
    model = empty_mask_engine().model.half()
    with pytest.raises(ValueError, match=r"torch.float16: give Engine fp32 weights .*bf16=True"):
        Engine(model)


@pytest.mark.parametrize("direction", [[np.nan] * 9, [0.0] * 9, [1, 0, 0, 0, 1, 0, 0, 0, 0]])
def test_a_direction_matrix_without_an_axis_direction_is_refused(direction):
    with pytest.raises(ImageError, match="orientation is unknown"):
        Reorientation.from_direction(direction)


def test_stale_writes_of_a_file_are_removed_and_no_other_files(tmp_path):
    own = tmp_path / ".lite.pt.k3j_x9q2.tmp"
    other = tmp_path / ".lite.pt.resume.k3j_x9q2.tmp"  # the resume state's write, maybe in progress
    for f in (own, other, tmp_path / "lite.pt"):
        f.write_bytes(b"x")
    assert remove_stale_writes(tmp_path / "lite.pt") == 1
    assert not own.exists() and other.exists() and (tmp_path / "lite.pt").exists()


def test_a_sliding_window_near_the_volumes_end_is_moved_inside_it():
    assert _starts(95, 110, 32, 0.25, 120) == [88]  # a whole window at native resolution, not a clipped one
    assert _starts(5, 20, 32, 0.25, 120) == [5]
    assert _starts(0, 20, 32, 0.25, 24) == [0]  # a volume smaller than the window: clipped
    assert _starts(0, 100, 32, 0.25, 120) == [0, 24, 48, 68]
