import numpy as np
import pytest

from raps3d import Box, Engine, ImageError, ImageState, InteractiveObject, PromptError, load_model
from raps3d.predictor import UNDO_STEPS
from raps3d.sliding_window import sliding_window_zoom_in

from library_fixtures import SHIPPED_MODEL, empty_mask_engine, open_image, real_ct, synthetic_volume, untrained_engine


@pytest.fixture(scope="module")
def engine():
    return empty_mask_engine()


@pytest.fixture(scope="module")
def ct(engine):
    """A real abdominal CT where the data folder is at hand; otherwise random voxels of its size. The engine's
    masks are empty either way: the tests using it check the interaction protocol, not what is segmented."""
    from raps3d.training.data import data_root, read_zyx

    path = data_root() / "totalsegmentator" / "example_ct.nii.gz"
    if path.exists():
        return ImageState(engine, *read_zyx(path))
    return ImageState(engine, synthetic_volume((112, 101, 122)), (1.5, 1.5, 1.5))


@pytest.fixture(scope="module")
def shipped_ct():
    """The same CT with the shipped model: masks that are not empty, so comparing them means something."""
    volume, spacing = real_ct("totalsegmentator/example_ct.nii.gz")
    return ImageState(Engine(load_model(SHIPPED_MODEL)[0]), volume, spacing)


def encoded_regions(engine, monkeypatch) -> list:
    """The regions the engine encodes from now on (the real encoder still runs)."""
    regions, encode = [], engine.encode
    monkeypatch.setattr(engine, "encode", lambda volume, frame: regions.append(frame.box) or encode(volume, frame))
    return regions


def test_first_point_runs_zoom_out_then_zoom_in_around_the_prompt(ct, monkeypatch):
    regions = encoded_regions(ct.engine, monkeypatch)
    obj = InteractiveObject(ImageState(ct.engine, ct.volume, ct.spacing))  # nothing cached yet
    r = obj.add_point((56, 50, 60))
    assert not r.cache_hit
    assert r.roi.contains((56, 50, 60))
    assert r.roi.size != ct.shape  # a zoom-in region, not the whole volume
    assert regions[0] == Box((0, 0, 0), ct.shape) and regions[-1] == r.roi  # zoom-out first, zoom-in last
    assert r.full_mask().shape == ct.shape and r.mask_roi.shape == r.roi.size


def test_edit_inside_roi_reuses_features_and_outside_expands(ct, monkeypatch):
    obj = InteractiveObject(ct)
    first = obj.add_point((56, 50, 60))
    regions = encoded_regions(ct.engine, monkeypatch)
    inside = obj.add_point((57, 52, 61), positive=False)
    assert inside.cache_hit and inside.roi == first.roi
    assert regions == []  # no encoder pass ran
    far = (5, 95, 118)
    assert not first.roi.contains(far)
    outside = obj.add_point(far)
    assert not outside.cache_hit
    assert outside.roi.contains(far) and outside.roi.contains_box(first.roi)
    assert len(obj.prompts.points) == 3


def test_a_background_click_outside_the_region_changes_nothing(shipped_ct, monkeypatch):
    obj = InteractiveObject(shipped_ct)
    first = obj.add_point((56, 50, 60))
    far = (5, 95, 118)
    assert not first.roi.contains(far) and first.mask_roi.any()
    regions = encoded_regions(shipped_ct.engine, monkeypatch)
    stray = obj.add_point(far, positive=False)
    # The mask is zero there already: the region keeps its resolution and the mask stays as it was.
    assert stray.roi == first.roi and stray.cache_hit and not regions
    np.testing.assert_array_equal(stray.full_mask(), first.full_mask())
    assert obj.prompts.points[-1] == (far, False)  # kept: it counts once a positive click grows the region to it
    np.testing.assert_array_equal(obj.undo().full_mask(), first.full_mask())
    assert len(obj.prompts.points) == 1


def test_a_viewers_buffer_is_brought_up_to_date_from_the_changed_box():
    image = open_image(untrained_engine(3), synthetic_volume())  # random weights: masks that are not empty
    obj = InteractiveObject(image)
    first = obj.add_point((20, 35, 45))
    inside = obj.add_point((22, 36, 44), positive=False)
    outside = obj.add_point((2, 5, 5))
    assert first.mask_roi.any() and outside.mask_roi.any() and outside.roi.contains_box(first.roi)
    assert not np.array_equal(inside.full_mask(), outside.full_mask())
    buffer = inside.full_mask()
    np.testing.assert_array_equal(outside.update(buffer), outside.full_mask())


def test_zoom_out_features_are_shared_between_objects(ct, monkeypatch):
    regions = encoded_regions(ct.engine, monkeypatch)
    image = ImageState(ct.engine, ct.volume, ct.spacing)
    InteractiveObject(image).add_point((56, 50, 60))
    r = InteractiveObject(image).add_box(56, (40, 50), (60, 70))
    assert r.timings["zoom_out_cached"] is True
    assert regions.count(Box((0, 0, 0), ct.shape)) == 1  # the whole volume was encoded once for both objects


def test_undo_restores_previous_state_and_reset_clears(shipped_ct):
    obj = InteractiveObject(shipped_ct)
    first = obj.add_point((56, 50, 60))
    second = obj.add_point((5, 95, 118))
    assert first.mask_roi.any() and second.roi != first.roi
    back = obj.undo()
    assert back.roi == first.roi and len(obj.prompts.points) == 1
    np.testing.assert_array_equal(back.mask_roi, first.mask_roi)
    assert obj.undo() is None and obj.result is None
    with pytest.raises(PromptError, match="nothing to undo"):
        obj.undo()
    obj.add_point((56, 50, 60))
    obj.reset()
    assert obj.result is None and obj.prompts.points == ()


def test_an_undo_that_fails_loses_no_step(ct, monkeypatch):
    import raps3d.predictor as predictor

    obj = InteractiveObject(ct)
    for point in ((56, 50, 60), (57, 51, 60), (58, 50, 61)):
        obj.add_point(point)

    def out_of_memory(*args, **kwargs):
        raise MemoryError("no memory for the mask")

    with monkeypatch.context() as m:
        m.setattr(predictor, "logits_to_mask", out_of_memory)
        with pytest.raises(MemoryError):
            obj.undo()
    assert len(obj.prompts.points) == 3
    obj.undo()
    assert len(obj.prompts.points) == 2


def test_undo_reaches_back_a_bounded_number_of_steps(shipped_ct):
    obj = InteractiveObject(shipped_ct)
    results = [obj.add_point((56, 50, 60))]
    for i in range(UNDO_STEPS + 2):
        results.append(obj.add_point((50 + i % 5, 45 + i % 7, 60), positive=i % 3 != 2))
    assert all(r.mask_roi.any() for r in results) and len({r.mask_roi.tobytes() for r in results}) > 10
    for expected in results[-2::-1][:UNDO_STEPS]:  # the mask of each earlier step, rebuilt exactly
        back = obj.undo()
        assert back.roi == expected.roi and back.cache_hit
        np.testing.assert_array_equal(back.mask_roi, expected.mask_roi)
    assert len(obj.prompts.points) == 3  # the first two steps fell out of the history
    with pytest.raises(PromptError, match="nothing to undo"):
        obj.undo()


def test_box_depth_extent_and_flipped_corners(shipped_ct):
    a = InteractiveObject(shipped_ct).add_box(56, (40, 50), (60, 70))
    b = InteractiveObject(shipped_ct).add_box(56, (60, 70), (40, 50))  # corners given the other way round
    assert a.roi == b.roi and a.mask_roi.any()
    np.testing.assert_array_equal(a.mask_roi, b.mask_roi)
    assert a.roi.start[0] < 56 < a.roi.stop[0] - 1  # the slice box looks above and below its slice


@pytest.mark.parametrize("call,message", [
    (lambda o: o.add_point((200, 10, 10)), "outside the volume"),
    (lambda o: o.add_point((-1, 10, 10)), "outside the volume"),
    (lambda o: o.add_point((1, 2)), "three numbers"),
    (lambda o: o.add_point((np.nan, 2, 3)), "non-finite"),
    (lambda o: o.interact(), "no prompt"),
    (lambda o: o.add_point((50, 50, 50), positive=False), "positive point or a box"),
    (lambda o: o.add_box(50, (10, 10), (10, 40)), "no area"),
    (lambda o: o.add_box(50, (500, 500), (600, 700)), "outside the slice"),
    (lambda o: o.add_box(500, (10, 10), (20, 20)), "outside the volume"),
    (lambda o: o.interact(points=[((50, 50, 50), True)] * 129), "at most 128 points"),
])
def test_bad_prompts_get_clear_errors_and_lose_nothing(ct, call, message):
    obj = InteractiveObject(ct)
    with pytest.raises(PromptError, match=message):
        call(obj)
    assert obj.result is None
    if "positive point" in message:
        return  # a negative point is a valid edit once the object exists
    obj.add_point((56, 50, 60))
    before = obj.result
    with pytest.raises(PromptError):
        call(obj)
    assert obj.result is before and len(obj.prompts.points) == 1


def test_an_objects_logits_hold_only_their_own_memory(ct):
    obj = InteractiveObject(ct)
    obj.add_point((56, 50, 60))  # one point: the decoder returns several candidate masks, one is kept
    obj.add_point((56, 52, 64))
    for logits in [obj._state.logits] + [state.logits for state in obj._history if state.logits is not None]:
        assert logits.untyped_storage().nbytes() == logits.numel() * logits.element_size()


def test_box_partly_outside_is_clipped(ct):
    obj = InteractiveObject(ct)
    r = obj.add_box(56, (80, 100), (140, 160))
    box = obj.prompts.box
    assert (box.y0, box.x0, box.y1, box.x1) == (80, 100, ct.shape[1] - 1, ct.shape[2] - 1)
    assert r.roi.stop[1] <= ct.shape[1] and r.roi.stop[2] <= ct.shape[2]


def test_second_box_on_one_object_is_refused(ct):
    obj = InteractiveObject(ct)
    obj.add_box(56, (40, 50), (60, 70))
    with pytest.raises(PromptError, match="already has a box"):
        obj.add_box(50, (40, 50), (60, 70))


@pytest.mark.parametrize("volume,message", [
    (np.zeros((64, 64), np.int16), "3D volume"),
    (np.zeros((1, 64, 64), np.int16), "single slice"),
    (np.full((8, 16, 16), np.nan, np.float32), "NaN"),
    (np.zeros((8, 16, 16), bool), "data type"),
])
def test_bad_images_are_refused(engine, volume, message):
    with pytest.raises(ImageError, match=message):
        ImageState(engine, volume)


def test_edit_without_cache_gives_the_same_mask():
    engine = untrained_engine(3)
    image = open_image(engine, synthetic_volume())
    cached, plain = InteractiveObject(image), InteractiveObject(image, use_cache=False)
    for obj in (cached, plain):
        obj.add_point((20, 35, 45))
    a, b = cached.add_point((22, 36, 44), False), plain.add_point((22, 36, 44), False)
    assert a.cache_hit and not b.cache_hit and a.mask_roi.any()
    np.testing.assert_array_equal(a.mask_roi, b.mask_roi)


def test_sliding_window_baseline_covers_the_roi(ct, monkeypatch):
    import torch

    obj = InteractiveObject(ct)
    obj.add_point((56, 50, 60))
    decode = ct.engine.decode
    # Every window says "all foreground": a region any window leaves out would stay 0.
    monkeypatch.setattr(ct.engine, "decode", lambda *a, **k: (torch.ones_like(decode(*a, **k)[0]), 1.0))
    regions = encoded_regions(ct.engine, monkeypatch)
    whole = Box((0, 0, 0), ct.shape)
    mask = sliding_window_zoom_in(obj, obj.prompts, whole)
    assert mask.shape == ct.shape and mask.dtype == np.uint8 and mask.all()
    window = ct.engine.config.input_shape
    assert len(regions) > 1 and all(all(s <= w for s, w in zip(b.size, window)) for b in regions)
    assert sorted({b.start[0] for b in regions})[-1] + window[0] == ct.shape[0]  # the last window ends at the edge


def test_result_update_writes_only_the_changed_box():
    from raps3d import Box, Result

    shape = (10, 20, 30)
    old = Result(np.ones((4, 5, 6), np.uint8), Box((1, 2, 3), (5, 7, 9)), Box((1, 2, 3), (5, 7, 9)), shape, False, 1.0)
    new_roi = Box((2, 2, 2), (8, 16, 20))
    new_mask = np.zeros(new_roi.size, np.uint8)
    new_mask[3:, 4:, 5:] = 1
    new = Result(new_mask, new_roi, new_roi.union(old.roi), shape, True, 1.0)
    buffer = old.full_mask()
    assert buffer.sum() == 4 * 5 * 6
    np.testing.assert_array_equal(new.update(buffer), new.full_mask())
