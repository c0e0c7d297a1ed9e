"""Volumes reach the model in one anatomical orientation, whatever order their file stores the voxels in."""

import numpy as np
import pytest
import SimpleITK as sitk

from raps3d.orientation import AxisFlips

OPENKBP = (1, 0, 0, 0, 1, 0, 0, 0, -1)  # slices from head to feet: the model's orientation
DICOM_SERIES = (1, 0, 0, 0, 1, 0, 0, 0, 1)  # slices from feet to head
NIFTI_RAS = (-1, 0, 0, 0, -1, 0, 0, 0, 1)


@pytest.mark.parametrize("direction,axes", [(OPENKBP, ()), (DICOM_SERIES, (0,)), (NIFTI_RAS, (0, 1, 2)),
                                            ((1, 0, 0, 0, -1, 0, 0, 0, -1), (1,))])
def test_flips_follow_the_direction_matrix(direction, axes):
    assert AxisFlips.from_direction(direction).axes == axes


def test_an_oblique_axis_is_flipped_by_the_physical_axis_it_mostly_follows():
    tilt = np.deg2rad(20)
    # k tilted 20 degrees from superior towards posterior; i, j as in a DICOM series.
    direction = np.array([[1, 0, 0], [0, np.cos(tilt), np.sin(tilt)], [0, -np.sin(tilt), np.cos(tilt)]])
    assert AxisFlips.from_direction(direction.ravel()).axes == (0,)
    # Sagittal slices (k runs towards the left), rows running head to feet, columns towards the back.
    sagittal = np.array([[0, 0, 1], [1, 0, 0], [0, -1, 0]])
    assert AxisFlips.from_direction(sagittal.ravel()).axes == ()


def test_the_same_anatomy_stored_in_any_voxel_order_reaches_the_model_as_the_same_array():
    rng = np.random.default_rng(0)
    image = sitk.GetImageFromArray(rng.integers(-1000, 1000, (6, 7, 8)).astype(np.int16))
    image.SetDirection(DICOM_SERIES)
    image.SetSpacing((0.8, 0.9, 2.5))
    seen = AxisFlips.from_direction(image.GetDirection()).volume(sitk.GetArrayFromImage(image))
    for flip_axes in ([True, False, False], [False, True, True], [True, True, True]):
        stored = sitk.Flip(image, flip_axes)  # same physical positions, voxels stored in another order
        assert stored.GetDirection() != image.GetDirection()
        flips = AxisFlips.from_direction(stored.GetDirection())
        np.testing.assert_array_equal(flips.volume(sitk.GetArrayFromImage(stored)), seen)


def test_points_boxes_and_masks_map_both_ways_onto_the_same_voxels():
    shape = (6, 7, 8)
    volume = np.arange(np.prod(shape)).reshape(shape)
    flips = AxisFlips((0, 2))
    model = flips.volume(volume)
    assert model.flags.c_contiguous and not np.shares_memory(model, volume)
    for zyx in [(0, 0, 0), (5, 6, 7), (2, 3, 4)]:
        mapped = flips.point(zyx, shape)
        assert model[tuple(int(c) for c in mapped)] == volume[zyx]
        assert flips.point(mapped, shape) == zyx
    assert flips.point((1.25, 2.0, 0.5), shape) == (3.75, 2.0, 6.5)  # fractional voxel positions too
    start, stop = (1, 2, 0), (3, 5, 2)
    mstart, mstop = flips.box(start, stop, shape)
    assert (mstart, mstop) == ((3, 2, 6), (5, 5, 8))
    region = volume[1:3, 2:5, 0:2]
    np.testing.assert_array_equal(flips.volume(model[tuple(slice(a, b) for a, b in zip(mstart, mstop))]), region)
    assert flips.box(mstart, mstop, shape) == (start, stop)
    unflipped = AxisFlips()
    assert unflipped.volume(volume) is volume and not unflipped
