import numpy as np
import pytest
import torch
import torch.nn.functional as F

from raps3d.geometry import Box, Frame, HU_WINDOW, logits_to_box, logits_to_mask, remap_logits, resample_box


@pytest.mark.parametrize("box,shape", [
    (Box((0, 0, 0), (37, 101, 122)), (32, 128, 128)),
    (Box((5, 17, 3), (14, 60, 91)), (32, 64, 64)),
    (Box((2, 2, 2), (3, 200, 9)), (32, 128, 128)),
])
def test_frame_round_trip_lands_on_the_voxel(box, shape):
    frame = Frame(box, shape)
    rng = np.random.default_rng(0)
    voxels = rng.integers(box.start, box.stop, size=(50, 3)).astype(float)
    back = frame.to_volume(frame.to_frame(voxels))
    np.testing.assert_allclose(back, voxels, atol=1e-9)
    # the box's first and last voxel centres map half a source voxel inside the frame's edges
    first = frame.to_frame(np.array([box.start], float))[0]
    np.testing.assert_allclose(first, 0.5 * frame.scale - 0.5)


def test_resample_box_matches_torch_interpolation():
    rng = np.random.default_rng(1)
    volume = rng.integers(-1200, 2000, size=(23, 41, 37)).astype(np.int16)
    box = Box((3, 5, 2), (20, 39, 30))
    out = resample_box(volume, box, (32, 64, 48), window=HU_WINDOW)
    crop = torch.from_numpy(volume[box.slices].astype(np.float32)).clamp(*HU_WINDOW)
    crop = (crop - HU_WINDOW[0]) / (HU_WINDOW[1] - HU_WINDOW[0])
    ref = F.interpolate(crop[None, None], size=(32, 64, 48), mode="trilinear", align_corners=False)[0, 0]
    np.testing.assert_allclose(out, ref.numpy(), atol=1e-5)
    assert out.min() >= 0 and out.max() <= 1


@pytest.mark.parametrize("shape,box", [
    ((60, 97, 131), Box((10, 20, 30), (47, 90, 101))),   # odd sizes
    ((25, 200, 180), Box((0, 40, 10), (25, 170, 177))),  # thin slices vs wide plane (anisotropic grid)
])
def test_pasted_mask_sits_on_the_right_voxels(shape, box):
    """A structure resampled into a frame's grid and pasted back lands where it was."""
    zz, yy, xx = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    c = [(a + b) / 2 + 3 for a, b in zip(box.start, box.stop)]
    r = [s * 0.25 for s in box.size]
    blob = (((zz - c[0]) / r[0]) ** 2 + ((yy - c[1]) / r[1]) ** 2 + ((xx - c[2]) / r[2]) ** 2) <= 1
    grid = resample_box(blob.astype(np.float32), box, (32, 64, 64))
    pasted = (logits_to_box(torch.from_numpy(grid - 0.5), box.size) > 0).numpy()
    full = np.zeros(shape, bool)
    full[box.slices] = pasted
    dice = 2 * (full & blob).sum() / (full.sum() + blob.sum())
    assert dice > 0.9
    np.testing.assert_allclose(np.argwhere(full).mean(0), np.argwhere(blob).mean(0), atol=0.6)


def test_remap_logits_between_frames_keeps_position():
    shape = (16, 32, 32)
    src = Frame(Box((10, 10, 10), (30, 50, 50)), (32, 128, 128))
    dst = Frame(Box((0, 0, 0), (40, 80, 80)), (32, 128, 128))
    logits = torch.full(shape, -5.0)
    logits[6:10, 12:20, 12:20] = 5.0
    moved = remap_logits(logits, src, dst)
    on = Frame(dst.box, shape).to_volume(np.argwhere(moved.numpy() > 0)).mean(0)
    was = Frame(src.box, shape).to_volume(np.argwhere(logits.numpy() > 0)).mean(0)
    np.testing.assert_allclose(on, was, atol=1.5)
    assert moved[0, 0, 0] < -10  # outside the source frame: background


def test_box_from_extent_min_size_and_clipping():
    b = Box.from_extent((5, 5, 5), (6, 6, 6), (0, 0, 0), (8, 20, 20), (10, 100, 100))
    assert b.size == (8, 20, 20) and b.contains((5, 5, 5))
    b = Box.from_extent((0, 95, 0), (2, 99, 3), (2, 2, 2), (4, 30, 4), (10, 100, 100))
    assert b.start[1] == 70 and b.stop[1] == 100  # pushed back inside, size kept
    with pytest.raises(ValueError):
        Box((0, 0, 0), (0, 1, 1))


def test_a_point_lies_in_a_box_when_its_voxel_does():
    box = Box((2, 2, 2), (5, 5, 5))  # voxels 2..4: from 1.5 to 4.5
    assert box.contains((4.49, 3, 3)) and box.contains((1.5, 3, 3)) and box.contains((2, 4, 4))
    assert not box.contains((4.5, 3, 3)) and not box.contains((1.49, 3, 3)) and not box.contains((3, 3, 5))


def test_logits_to_box_equals_trilinear_interpolation():
    logits = torch.randn(8, 16, 12)
    ours = logits_to_box(logits, (37, 50, 29))
    ref = F.interpolate(logits[None, None], size=(37, 50, 29), mode="trilinear", align_corners=False)[0, 0]
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_logits_to_mask_is_the_thresholded_interpolation():
    logits = torch.randn(8, 16, 12)
    mask = logits_to_mask(logits, (37, 50, 29), slab=5)
    assert mask.dtype == np.uint8 and mask.shape == (37, 50, 29)
    ref = (logits_to_box(logits, (37, 50, 29)) > 0).numpy()
    assert (mask.astype(bool) != ref).sum() <= 2  # float rounding at exact zero crossings only


@pytest.mark.parametrize("where", [(slice(2, 4), slice(5, 9), slice(3, 6)),    # inside
                                   (slice(0, 1), slice(0, 3), slice(10, 12)),  # touching the edges
                                   (slice(7, 8), slice(15, 16), slice(0, 1))])  # a single corner cell
def test_logits_to_mask_of_a_local_structure_equals_the_dense_mask(where):
    torch.manual_seed(0)
    logits = -1 - torch.rand(8, 16, 12)
    logits[where] = torch.randn(logits[where].shape).abs() + 0.1
    size = (37, 50, 29)
    mask = logits_to_mask(logits, size, slab=5)
    ref = (logits_to_box(logits, size) > 0).numpy()
    assert mask.shape == size and ref.any()
    assert (mask.astype(bool) != ref).sum() <= 2
    assert not logits_to_mask(-torch.ones(8, 16, 12), size).any()


def test_logits_to_mask_of_a_region_smaller_than_the_logits_skips_unread_slices():
    # 10 output slices from 32 logit slices read only some of them: positives on an unread slice make no mask.
    logits = torch.full((32, 64, 64), -5.0)
    logits[3, 20:30, 20:30] = 5.0
    size = (10, 40, 40)
    assert not (logits_to_box(logits, size) > 0).any()
    mask = logits_to_mask(logits, size)
    assert mask.shape == size and not mask.any()
    logits[4, 20:30, 20:30] = 5.0  # a slice that is read: the same as the dense mask
    np.testing.assert_array_equal(logits_to_mask(logits, size).astype(bool), (logits_to_box(logits, size) > 0).numpy())


def test_box_roi_follows_the_box_in_plane_and_bounds_the_depth():
    from raps3d.roi import roi_for_box

    shape, spacing = (100, 200, 200), (2.0, 1.0, 1.0)
    frame = Frame(Box((0, 0, 0), shape), (32, 128, 128))
    logits = -np.ones((32, 64, 64), np.float32)
    logits[:, 20:40, 20:40] = 1  # a coarse zoom-out mask: a column through every slice
    roi = roi_for_box(logits, frame, 50, (70, 70), (110, 110), spacing, shape)
    # in-plane: the drawn box plus a margin, not the whole column
    assert 55 <= roi.start[1] < 70 and 110 < roi.stop[1] <= 125
    # depth: at most twice half the box's larger size (41 mm / 2 / 2 mm per slice ~ 10 slices) each way, plus margin
    assert roi.start[0] >= 50 - 2 * 10.25 - 10 and roi.stop[0] <= 50 + 2 * 10.25 + 11
    assert roi.start[0] < 50 - 10 and roi.stop[0] > 50 + 10  # ... and at least once that, since the mask goes on
    logits[:] = -1  # no zoom-out mask: the depth from the box's size alone
    roi = roi_for_box(logits, frame, 50, (70, 70), (110, 110), spacing, shape)
    assert 50 - 10.25 - 10 <= roi.start[0] <= 50 - 10 and 50 + 10 < roi.stop[0] <= 50 + 10.25 + 11


def test_mask_covers_tells_whether_the_coarse_mask_reaches_the_prompt():
    from raps3d.roi import mask_covers

    shape = (100, 200, 200)
    frame = Frame(Box((0, 0, 0), shape), (32, 128, 128))
    logits = -np.ones((32, 64, 64), np.float32)
    logits[10:20, 20:40, 20:40] = 1  # volume voxels z 31..62, y and x 62..124
    assert mask_covers(logits, frame, np.array([[40.0, 90.0, 90.0]]))
    assert mask_covers(logits, frame, np.array([[5.0, 5.0, 5.0], [45.0, 100.0, 70.0]]))  # one seed is enough
    assert not mask_covers(logits, frame, np.array([[40.0, 150.0, 90.0], [80.0, 90.0, 90.0]]))
    assert not mask_covers(-logits * 0 - 1, frame, np.array([[40.0, 90.0, 90.0]]))


def test_logits_to_mask_applies_a_threshold():
    torch.manual_seed(1)
    logits = torch.randn(8, 16, 12) * 3
    size = (37, 50, 29)
    for t in (-1.5, 0.0, 2.0):
        mask = logits_to_mask(logits, size, threshold=t).astype(bool)
        ref = (logits_to_box(logits, size) > t).numpy()
        assert (mask != ref).sum() <= 2, t
    low, zero = logits_to_mask(logits, size, threshold=-1.5), logits_to_mask(logits, size)
    assert low.sum() > zero.sum() and not (zero & (1 - low)).any()  # a lower threshold only adds voxels
