"""From a viewer's stateless request to the library's stateful interaction.

Viewers resend every prompt of the current object on each click. The request is compared with the cached object
of the same (client, image, label):

- same box and every earlier point still there, new points added: an edit, one step per new point (decoder only
  inside the zoom-in ROI);
- exactly the same prompts: the cached result is returned as it is (``repeat``);
- the prompts of the step before: the library's undo (``undo``; viewers that remove the last click);
- anything else: a new object, built from the request's prompts alone (``new_object``).

A new object takes the prompts one at a time, as a viewer sends them and as the model was trained: the box (or the
first foreground point), then each further point as an edit of the mask before, in the request's order. So a reply
never depends on prompts the request did not send, and it is the same whether the session was still cached or not
(evicted, expired, or taken over by another annotator with the same client id), however many clicks each request
added (up to MAX_REPLAY_STEPS steps), and undo works after it. A refused request leaves the session as it was.
Viewers send foreground and background points as two lists: where background clicks fell among the foreground ones
is not known, and they are replayed after them.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Hashable

import raps3d

from .prompts import PromptSet


# A request with more prompts than this is replayed in this many steps: the first prompt, then the earliest points at
# once, then the latest ones one per step (so that undo still goes back one click at a time). A step is a decoder
# pass (0.01-0.05 s on a CPU), or an encoder pass when a positive point grows the region (0.1-0.2 s); an object takes
# up to 128 points.
MAX_REPLAY_STEPS = 32


@dataclass
class Outcome:
    result: raps3d.Result | None  # None: the object has no mask (after a reset, or undo back to nothing)
    mode: str  # new_object | edit | repeat | undo | reset
    features_reused: bool  # image features came from the cache (no encoder pass at all)
    timings: dict | None = None  # the model's seconds per stage, of every step that ran (None: the result's own)
    prompts: raps3d.Prompts = raps3d.Prompts()  # the object's prompts afterwards


def replay_steps(prompts: PromptSet) -> list[tuple[tuple, tuple | None]]:
    """The request's prompts as the library's steps ``(points, box)``: the box, or the first point, then one point
    per step (at most MAX_REPLAY_STEPS steps: the earliest points after the first prompt are then taken together)."""
    points = list(prompts.points)
    if prompts.box is not None:
        steps = [((), prompts.box.to_library())]
    else:
        steps = [(tuple(points[:1]), None)]  # a first point that is background is refused by the library
        points = points[1:]
    steps += [((p,), None) for p in points]
    if len(steps) > MAX_REPLAY_STEPS:
        together = len(steps) - MAX_REPLAY_STEPS + 1  # steps 1..together become one
        steps = [steps[0], (tuple(p for s in steps[1:together + 1] for p in s[0]), None)] + steps[together + 1:]
    return steps


def _add_up(timings: dict, step: dict) -> None:
    for name, value in step.items():
        if isinstance(value, float):
            timings[name] = timings.get(name, 0.0) + value  # seconds add up
        else:
            timings.setdefault(name, value)  # flags: the first step's


def _new_object(store: raps3d.SessionStore, key, image: raps3d.ImageState, prompts: PromptSet) -> Outcome:
    # Built apart and kept only once every step succeeded: a refused prompt leaves the session it would replace (its
    # mask, undo history and cached features) as it was.
    obj = raps3d.InteractiveObject(image)
    timings: dict = {}
    steps = replay_steps(prompts)
    with obj.lock:
        for points, box in steps:
            result = obj.interact(points=points, box=box)
            _add_up(timings, result.timings)
    store.keep_object(key, obj)
    # Both passes ran; the zoom-out features may have come from another object on the same image.
    return Outcome(result, "new_object", False, {**timings, "steps": len(steps)}, obj.prompts)


def _edit(obj: raps3d.InteractiveObject, added: list) -> Outcome:
    """The new points one per step, as a new object replays them: the mask then does not depend on how many clicks
    a viewer sent per request, and undo goes back one click at a time. All or nothing: when a step fails, the object
    is as it was before the first."""
    timings: dict = {}
    reused = True
    with obj.all_or_nothing():
        for point in added:
            result = obj.interact(points=[point])
            reused = reused and result.cache_hit
            _add_up(timings, result.timings)
    return Outcome(result, "edit", reused, {**timings, "steps": len(added)} if len(added) > 1 else None, obj.prompts)


def apply_prompts(store: raps3d.SessionStore, key: tuple[Hashable, Hashable, Hashable], image: raps3d.ImageState,
                  prompts: PromptSet) -> Outcome:
    # One request at a time per key: a click that arrives while the one before still builds the object waits for
    # it and edits it, instead of building the object a second time.
    with store.key_lock(key):
        obj = store.find_object(key)
        if obj is None or obj.image is not image:
            return _new_object(store, key, image, prompts)
        with obj.lock:
            current = obj.prompts
            if obj.result is not None and prompts.matches(current):
                return Outcome(obj.result, "repeat", True, None, current)
            same_box = (prompts.box is None and current.box is None) or (
                prompts.box is not None and prompts.box.same_as(current.box))
            if same_box and obj.result is not None:
                wanted, have = prompts.point_counts(), Counter(current.points)
                if all(wanted[p] >= n for p, n in have.items()):
                    added = []
                    extra = wanted - have
                    for p in prompts.points:  # keep the request's order for the new points
                        if extra[p] > 0:
                            added.append(p)
                            extra[p] -= 1
                    return _edit(obj, added)
                # Fewer prompts than the object has: a viewer-side undo of the last click? Checked before undoing,
                # so that a request that is not one leaves the object as it was if its new object is refused.
                previous = obj.previous_prompts  # (a step with prompts: one the request's can match)
                if previous is not None and prompts.matches(previous):
                    return Outcome(obj.undo(), "undo", True, None, obj.prompts)
        return _new_object(store, key, image, prompts)


def undo(store: raps3d.SessionStore, key, image: raps3d.ImageState, name: str | None = None) -> Outcome:
    """An explicit undo: raises SessionError when there is no session, PromptError when nothing is left to undo.
    ``name``: the object's name in messages (the key's by default)."""
    with store.key_lock(key):
        obj = store.find_object(key)
        if obj is None or obj.image is not image:
            raise raps3d.SessionError(f"nothing to undo: client {key[0]!r} has no session for label "
                                      f"{(name if name is not None else key[2])!r} on this image (never started, "
                                      "reset, or expired); start with a first prompt")
        result = obj.undo()
        return Outcome(result, "undo", True, None, obj.prompts)


def reset(store: raps3d.SessionStore, key) -> Outcome:
    with store.key_lock(key):
        store.drop_object(key)
    return Outcome(None, "reset", True)
