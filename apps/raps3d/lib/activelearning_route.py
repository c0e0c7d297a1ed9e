"""MONAI Label's next-sample route, run in a worker thread, one hand-out at a time.

Over DICOMweb, handing out an image fetches and converts its series (seconds for a large one). MONAI Label declares
``POST /activelearning/{strategy}`` as a coroutine that does this inline, so meanwhile the server answered nothing
else: no click, no ``/info``. The same endpoint declared as a plain function runs in FastAPI's thread pool.
Hand-outs still take turns (a lock): the pick and its record must not interleave, or two annotators asking at once
would get the same image.
"""

import logging
import threading
from typing import Optional

from fastapi import Depends
from fastapi.routing import APIRoute
from monailabel.config import settings
from monailabel.endpoints.activelearning import sample
from monailabel.endpoints.user.auth import RBAC, User
from monailabel.interfaces.utils.app import app_instance

from .routes import check_known, put_first

logger = logging.getLogger(__name__)

ROUTE_NAME = "raps3d_next_sample_threaded"
_HAND_OUT = threading.Lock()


def raps3d_next_sample(strategy: str, params: Optional[dict] = None,
                       user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER))):
    check_known("strategy", strategy, app_instance()._strategies)
    with _HAND_OUT:
        return sample(strategy, params, user.username)


def install(fastapi_app=None) -> bool:
    """Puts the threaded route before MONAI Label's; False when it is there already."""
    route = APIRoute(f"{settings.MONAI_LABEL_API_STR}/activelearning/{{strategy}}", raps3d_next_sample,
                     methods=["POST"], name=ROUTE_NAME,
                     summary="Run Active Learning strategy to get next sample (in a worker thread)")
    if not put_first(route, fastapi_app):
        return False
    logger.info("Raps-3D: next-sample requests run in worker threads")
    return True
