"""Volumes reach the model in one anatomical orientation, whatever order their file stores the voxels in."""

import itertools

import numpy as np
import pytest
import SimpleITK as sitk

from raps3d.orientation import Reorientation

OPENKBP = (1, 0, 0, 0, 1, 0, 0, 0, -1)  # slices from head to feet: the model's orientation
DICOM_SERIES = (1, 0, 0, 0, 1, 0, 0, 0, 1)  # slices from feet to head
NIFTI_RAS = (-1, 0, 0, 0, -1, 0, 0, 0, 1)
# Sagittal slices (k runs towards the left), rows from head to feet (j), columns towards the back (i).
SAGITTAL = (0, 0, 1, 1, 0, 0, 0, -1, 0)
# Coronal slices (k runs towards the back), rows from head to feet (j), columns towards the left (i).
CORONAL = (1, 0, 0, 0, 0, 1, 0, -1, 0)
# A decubitus scan: axial slices (k towards the head) whose rows run towards the back (i) and columns to the right (j).
DECUBITUS = (0, -1, 0, 1, 0, 0, 0, 0, 1)


@pytest.mark.parametrize("direction,order,flips", [
    (OPENKBP, (0, 1, 2), ()), (DICOM_SERIES, (0, 1, 2), (0,)), (NIFTI_RAS, (0, 1, 2), (0, 1, 2)),
    ((1, 0, 0, 0, -1, 0, 0, 0, -1), (0, 1, 2), (1,)),
    # Model z (head to feet) is the stored rows (axis 1), y (to the back) the columns (2), x (to the left) the slices.
    (SAGITTAL, (1, 2, 0), ()),
    # Model y (to the back) is the stored slices (axis 0), z the rows.
    (CORONAL, (1, 0, 2), ()),
    # Still axial slices, rows and columns swapped.
    (DECUBITUS, (0, 2, 1), (0, 2))])
def test_the_reorientation_follows_the_direction_matrix(direction, order, flips):
    orientation = Reorientation.from_direction(direction)
    assert (orientation.order, orientation.flips) == (order, flips)
    assert orientation.keeps_slices == (order[0] == 0)


def test_an_oblique_axis_goes_by_the_physical_axis_it_mostly_follows():
    tilt = np.deg2rad(20)
    # k tilted 20 degrees from superior towards posterior; i, j as in a DICOM series.
    direction = np.array([[1, 0, 0], [0, np.cos(tilt), np.sin(tilt)], [0, -np.sin(tilt), np.cos(tilt)]])
    assert Reorientation.from_direction(direction.ravel()) == Reorientation((0, 1, 2), (0,))
    # Tilted 45 degrees, k follows superior and posterior equally: the stored order is kept.
    half = np.deg2rad(45)
    direction = np.array([[1, 0, 0], [0, np.cos(half), np.sin(half)], [0, -np.sin(half), np.cos(half)]])
    assert Reorientation.from_direction(direction.ravel()).order == (0, 1, 2)


def _stored_orders():
    """Every way a file can store the same anatomy: 6 axis orders x 8 directions of travel."""
    for permutation in itertools.permutations(range(3)):
        for signs in itertools.product((1, -1), repeat=3):
            yield permutation, signs


def _store(image: sitk.Image, permutation, signs) -> sitk.Image:
    """The same physical voxels stored with index axes permuted and reversed."""
    stored = sitk.PermuteAxes(image, list(permutation))
    return sitk.Flip(stored, [s < 0 for s in signs])


def test_the_same_anatomy_stored_in_any_voxel_order_reaches_the_model_as_the_same_array_and_spacing():
    rng = np.random.default_rng(0)
    image = sitk.GetImageFromArray(rng.integers(-1000, 1000, (6, 7, 8)).astype(np.int16))
    image.SetDirection(DICOM_SERIES)
    image.SetSpacing((0.8, 0.9, 2.5))
    reference = Reorientation.from_direction(image.GetDirection())
    seen = reference.volume(sitk.GetArrayFromImage(image))
    spacing = reference.spacing(image.GetSpacing()[::-1])
    assert spacing == (2.5, 0.9, 0.8)
    for permutation, signs in _stored_orders():
        stored = _store(image, permutation, signs)
        orientation = Reorientation.from_direction(stored.GetDirection())
        array = sitk.GetArrayFromImage(stored)
        np.testing.assert_array_equal(orientation.volume(array), seen, err_msg=f"{permutation} {signs}")
        assert orientation.spacing(stored.GetSpacing()[::-1]) == spacing
        assert orientation.shape(array.shape) == seen.shape
        np.testing.assert_array_equal(orientation.volume_back(seen), array)


@pytest.mark.parametrize("orientation", [Reorientation((0, 1, 2), (0, 2)), Reorientation((1, 2, 0), (1,)),
                                         Reorientation((2, 0, 1), (0, 1, 2)), Reorientation((1, 0, 2), ())])
def test_points_boxes_and_masks_map_both_ways_onto_the_same_voxels(orientation):
    shape = (6, 7, 8)
    volume = np.arange(np.prod(shape)).reshape(shape)
    model = orientation.volume(volume)
    assert model.flags.c_contiguous and not np.shares_memory(model, volume)
    for zyx in [(0, 0, 0), (5, 6, 7), (2, 3, 4), (5, 0, 3)]:
        mapped = orientation.point(zyx, shape)
        assert model[tuple(int(c) for c in mapped)] == volume[zyx]
        assert orientation.point_back(mapped, shape) == zyx
    # Fractional positions move with their voxel: 0.25 into voxel 1 stays 0.25 from that voxel's centre.
    fractional = orientation.point((1.25, 2.0, 0.5), shape)
    for model_axis, stored_axis in enumerate(orientation.order):
        whole = orientation.point((1, 2, 0), shape)[model_axis]
        step = (1.25, 2.0, 0.5)[stored_axis] - (1, 2, 0)[stored_axis]
        assert fractional[model_axis] == whole + (-step if model_axis in orientation.flips else step)
    start, stop = (1, 2, 0), (3, 5, 2)
    mstart, mstop = orientation.box(start, stop, shape)
    region = volume[1:3, 2:5, 0:2]
    np.testing.assert_array_equal(orientation.volume_back(model[tuple(slice(a, b) for a, b in zip(mstart, mstop))]),
                                  region)
    assert orientation.box_back(mstart, mstop, shape) == (start, stop)


def test_a_volume_in_the_models_orientation_is_not_copied():
    volume = np.zeros((3, 4, 5))
    identity = Reorientation()
    assert not identity and identity.volume(volume) is volume and identity.volume_back(volume) is volume
