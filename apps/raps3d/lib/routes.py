"""Routes the app places before MONAI Label's own, in MONAI Label's FastAPI app (FastAPI takes the first match), and
what they share."""

import json
import logging

from fastapi import BackgroundTasks, HTTPException
from fastapi.routing import APIRoute
from monailabel.utils.others.generic import remove_file

logger = logging.getLogger(__name__)

MAX_NAME_BYTES = 200


def put_first(route: APIRoute, fastapi_app=None) -> bool:
    """Puts ``route`` before every other route; False when a route of that name is there already."""
    if fastapi_app is None:
        from monailabel.app import app as fastapi_app
    if any(getattr(r, "name", "") == route.name for r in fastapi_app.router.routes):
        return False
    fastapi_app.router.routes.insert(0, route)
    return True


def check_plain_name(value, what: str) -> None:
    """A 400 unless ``value`` is a name a datastore may turn into a file or folder name: MONAI Label's local
    datastore joins image ids and label tags into paths unchecked (``tag=../../x`` would write outside it)."""
    if not isinstance(value, str) or not value.strip() or value in (".", "..") or any(c in value for c in "/\\\0"):
        raise HTTPException(status_code=400, detail=f"{what} must be a plain name (no '/', '\\' or '..'), "
                                                    f"got {str(value)[:80]!r}")
    if len(value.encode()) > MAX_NAME_BYTES:  # the file system's limit is 255 bytes, with the datastore's suffixes
        raise HTTPException(status_code=400, detail=f"{what} must be at most {MAX_NAME_BYTES} bytes long, got "
                                                    f"{len(value.encode())}")


def check_known(kind: str, name: str, known) -> None:
    """A 404 naming what there is, unless ``name`` is one of ``known``: MONAI Label answers an unknown model or
    strategy with a 500 (or starts a background run that then fails)."""
    if name not in known:
        raise HTTPException(status_code=404, detail=f"no {kind} {str(name)[:80]!r}; there is "
                                                    + ", ".join(repr(k) for k in sorted(known)))


def check_tag(value, what: str) -> None:
    """``check_plain_name``, and no space around it: " final" would be a tag of its own, never counted as final."""
    check_plain_name(value, what)
    if value != value.strip():
        raise HTTPException(status_code=400, detail=f"{what} must not start or end with a space, got {value[:80]!r}")


def parse_params(params: str, what: str = "params") -> dict:
    """A request's ``params`` form field (or another named ``what``) as a dict; a 400 where MONAI Label's json.loads
    would answer 500."""
    try:
        values = json.loads(params) if params else {}
    except ValueError as e:
        raise HTTPException(status_code=400, detail=f"{what} is not valid JSON: {e}") from None
    except RecursionError:  # arrays nested thousands deep
        raise HTTPException(status_code=400, detail=f"{what} is nested too deeply") from None
    if not isinstance(values, dict):
        raise HTTPException(status_code=400, detail=f"{what} must be a JSON object")
    return values


def remove_uploads(background_tasks: BackgroundTasks) -> None:
    """Removes now the uploads a refused request queued for removal: MONAI Label queues that as background tasks,
    which run only after a successful response, so a refused request's upload (a whole CT, say) would stay in the
    temporary folder for good."""
    for task in background_tasks.tasks:
        if task.func is remove_file:
            try:
                task.func(*task.args, **task.kwargs)
            except OSError as e:  # the client still gets the request's own error
                logger.warning(f"could not remove an upload of a refused request: {e}")
