import threading
import time

import numpy as np
import pytest

from raps3d import SessionError, SessionStore

from library_fixtures import empty_mask_engine, synthetic_volume


@pytest.fixture(scope="module")
def engine():
    return empty_mask_engine()


def loader(seed):
    return lambda: (synthetic_volume((20, 40, 40), seed), (2.0, 1.0, 1.0))


def test_images_are_loaded_once_and_evicted_least_recently_used(engine):
    store = SessionStore(engine, max_images=2)
    calls = []
    for key in ("a", "b", "a", "c"):
        store.image(key, lambda k=key: calls.append(k) or loader(0)())
    assert calls == ["a", "b", "c"]
    assert store.is_open("a") and store.is_open("c") and not store.is_open("b")
    with pytest.raises(SessionError, match="not open"):
        store.image("b")

    def refused():
        raise ValueError("not a CT")

    with pytest.raises(ValueError):  # an image that fails to load pushes no other out
        store.image("d", refused)
    assert store.is_open("a") and store.is_open("c")


def test_objects_are_keyed_by_client_image_object_and_evicted(engine):
    store = SessionStore(engine, max_objects=2)
    image = store.image("img", loader(1))
    a = store.new_object(("alice", "img", "liver"), image)
    b = store.new_object(("bob", "img", "liver"), image)
    a.add_point((10, 20, 20))
    assert store.get_object(("bob", "img", "liver")).result is None  # bob's state is his own
    assert store.get_object(("alice", "img", "liver")) is a  # alice is now the most recently used
    store.new_object(("carol", "img", "liver"), image)
    with pytest.raises(SessionError, match="bob"):
        store.get_object(("bob", "img", "liver"))
    assert store.get_object(("alice", "img", "liver")) is a and b is not a


def test_an_object_on_an_image_evicted_meanwhile_answers_but_keeps_no_session(engine):
    store = SessionStore(engine, max_images=2)
    image = store.image("a", loader(3))  # one request opens image a ...
    store.image("b", loader(4))  # ... while others open enough images to evict it
    store.image("c", loader(5))
    assert not store.is_open("a")
    obj = store.new_object(("u", "a", "o"), image)
    assert obj.add_point((10, 20, 20)).full_mask().shape == (20, 40, 40)  # the request is still answered
    with pytest.raises(SessionError, match="no interaction session"):
        store.get_object(("u", "a", "o"))  # nothing keeps image a's volume in memory
    assert store.stats()["images"] == 2 and store.stats()["objects"] == 0


def test_idle_sessions_expire(engine):
    store = SessionStore(engine, idle_seconds=0.2)
    image = store.image("img", loader(2))
    store.new_object(("u", "img", "o"), image)
    time.sleep(0.3)
    with pytest.raises(SessionError, match="expired"):
        store.get_object(("u", "img", "o"))
    assert not store.is_open("img")


def test_an_image_whose_object_is_being_edited_stays_open(engine):
    store = SessionStore(engine, max_images=2, idle_seconds=1.0)
    key = ("u", "img", "o")
    store.new_object(key, store.image("img", loader(2))).add_point((10, 20, 20))
    for _ in range(3):  # requests for the object alone, each within the idle time, together longer than it
        time.sleep(0.4)
        store.get_object(key)
    assert store.is_open("img")
    store.image("other", loader(3))
    store.get_object(key).add_point((11, 21, 21))  # the image being edited is now the most recently used ...
    store.image("third", loader(4))  # ... so the other one makes room
    assert store.is_open("img") and not store.is_open("other")
    assert len(store.get_object(key).prompts.points) == 2


def test_concurrent_requests_load_once_and_keep_objects_apart(engine):
    store = SessionStore(engine)
    loads = []

    def slow_loader():
        loads.append(1)
        time.sleep(0.2)
        return loader(3)()

    errors, results = [], {}

    def user(name, point):
        try:
            image = store.image("shared", slow_loader)
            obj = store.new_object((name, "shared", "o"), image)
            for k in range(3):
                with obj.lock:
                    obj.add_point((point[0], point[1] + k, point[2]))
            results[name] = store.get_object((name, "shared", "o"))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=user, args=(f"u{i}", (5 + i, 10, 10 + 3 * i))) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(loads) == 1
    for i in range(4):
        pts = [p for p, _ in results[f"u{i}"].prompts.points]
        assert pts == [(5 + i, 10 + k, 10 + 3 * i) for k in range(3)]
