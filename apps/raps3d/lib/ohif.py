"""Serving the OHIF viewer bundled with MONAI Label, with its nested files.

MONAI Label 0.8.5 serves ``/ohif/<path>`` by joining the path with ``os.pathsep`` instead of the folder separator,
so any file below a sub-folder (``/ohif/assets/...``, ``/ohif/dicom-microscopy-viewer/...``) is not found and comes
back as ``index.html`` (with status 200 and an HTML type). This route, placed before MONAI Label's, serves the same
folder correctly: an existing file as itself (with its media type), a missing file (a name with an extension) as
404, and any other path (OHIF's own routes, e.g. ``/ohif/viewer?StudyInstanceUIDs=...``) as ``index.html``, as a
single-page app expects. Access rules are MONAI Label's: the same role is required as for its route.

OHIF reads the images through MONAI Label's DICOMweb proxy (``/proxy/dicom/{qido,wado}/...``), which forwards GET
requests without their query string and without the ``Accept`` header. OHIF asks for frames in any transfer syntax
(``transfer-syntax=*``); without that header the DICOMweb server must transcode to uncompressed, which fails for
JPEG 2000 on servers that cannot transcode it (Orthanc without its GDCM plugin), so such studies stay black. A GET
route placed before MONAI Label's forwards the query and ``Accept`` (same target URL, prefixes, credentials and
roles as MONAI Label's proxy). POST requests (STOW) are left to MONAI Label's proxy.

Either proxy sends the request with the PACS's credentials, and the path arrives percent-decoded (``..%2F`` is
``../``), which the HTTP client then resolves: any path on the PACS host (its admin API, say) would be reachable. Every
proxied path, GET or POST, must therefore look like a DICOMweb resource path, or the request is refused with 400.
"""

from __future__ import annotations

import logging
import mimetypes
import os
import re

import requests
from fastapi import Depends, HTTPException, Request
from fastapi.responses import FileResponse, Response
from fastapi.routing import APIRoute
from monailabel.config import settings
from monailabel.endpoints.user.auth import RBAC, User

logger = logging.getLogger(__name__)

MEDIA_TYPES = {".wasm": "application/wasm", ".js": "application/javascript", ".mjs": "application/javascript",
               ".json": "application/json", ".css": "text/css", ".svg": "image/svg+xml", ".html": "text/html"}


def ohif_folder() -> str:
    import monailabel.endpoints

    return os.path.join(os.path.dirname(os.path.realpath(monailabel.endpoints.__file__)), "static", "ohif")


def resolve(folder: str, path: str) -> str | None:
    """The file to send for ``/ohif/<path>``, or None for a missing file (404)."""
    index = os.path.join(folder, "index.html")
    path = path.strip("/")
    if not path:
        return index
    if "\0" in path:  # no file has such a name (and os.path would raise)
        return None
    candidate = os.path.realpath(os.path.join(folder, *path.split("/")))
    if os.path.commonpath([candidate, os.path.realpath(folder)]) != os.path.realpath(folder):
        return None  # outside the viewer's folder
    if os.path.isfile(candidate):
        return candidate
    if "." in path.rsplit("/", 1)[-1]:
        return None  # a file that is not there
    return index  # a route of the single-page app


def media_type(file: str) -> str:
    ext = os.path.splitext(file)[1].lower()
    return MEDIA_TYPES.get(ext) or mimetypes.guess_type(file, strict=False)[0] or "application/octet-stream"


def proxy_target(op: str, path: str) -> str:
    """The DICOMweb URL MONAI Label's proxy sends ``/proxy/dicom/<op>/<path>`` to (same prefixes)."""
    prefixes = {"wado": settings.MONAI_LABEL_WADO_PREFIX, "qido": settings.MONAI_LABEL_QIDO_PREFIX,
                "stow": settings.MONAI_LABEL_STOW_PREFIX}
    prefix = prefixes.get(op) or ""
    if op == "qido" and path.endswith("metadata"):  # some OHIF versions ask for metadata through QIDO
        prefix = settings.MONAI_LABEL_WADO_PREFIX or ""
    server = settings.MONAI_LABEL_STUDIES.rstrip("/")
    return f"{server}/{prefix.strip('/')}/{path}" if prefix else f"{server}/{path}"


# A DICOMweb resource path: segments of UIDs, keywords, frame lists, bulk data ids and coded values (OHIF's reject
# note: 113001^DCM), none of them "." or "..".
DICOMWEB_SEGMENT = re.compile(r"[A-Za-z0-9_,=.^-]+")


def check_proxy_path(path: str) -> None:
    """HTTPException 400 unless ``path`` is a DICOMweb resource path (no traversal, query or fragment in it)."""
    segments = path.split("/")
    if segments and segments[-1] == "":
        segments = segments[:-1]  # a trailing slash
    if not segments or any(seg in (".", "..") or not DICOMWEB_SEGMENT.fullmatch(seg) for seg in segments):
        raise HTTPException(status_code=400, detail="not a DICOMweb resource path")


FORWARDED_HEADERS = ("accept",)
RETURNED_HEADERS = ("content-type",)


def install_routes(fastapi_app=None) -> list[str]:
    """Puts the corrected ``/ohif/{path}`` route, and for DICOMweb studies the GET proxy routes and the path check
    of all other proxied requests, first in MONAI Label's FastAPI app. Returns the paths installed."""
    if fastapi_app is None:
        from monailabel.app import app as fastapi_app
    routes = []
    names = {getattr(r, "name", "") for r in fastapi_app.router.routes}
    api = settings.MONAI_LABEL_API_STR

    folder = ohif_folder()
    if "raps3d_ohif" not in names and os.path.isfile(os.path.join(folder, "index.html")):
        async def raps3d_ohif(path: str, user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER))):
            file = resolve(folder, path)
            if file is None:
                raise HTTPException(status_code=404, detail="Resource NOT Found")
            return FileResponse(file, media_type=media_type(file))

        routes.append(APIRoute(f"{api}/ohif/{{path:path}}", raps3d_ohif, methods=["GET"], name="raps3d_ohif",
                               include_in_schema=False))

    studies = settings.MONAI_LABEL_STUDIES or ""
    remote = studies.startswith(("http://", "https://"))
    if "raps3d_proxy" not in names and remote and "googleapis.com" not in studies:
        def proxy(request: Request, op: str, path: str):
            check_proxy_path(path)
            auth = None
            if settings.MONAI_LABEL_DICOMWEB_USERNAME and settings.MONAI_LABEL_DICOMWEB_PASSWORD:
                auth = (settings.MONAI_LABEL_DICOMWEB_USERNAME, settings.MONAI_LABEL_DICOMWEB_PASSWORD)
            headers = {k: v for k, v in request.headers.items() if k.lower() in FORWARDED_HEADERS}
            try:
                reply = requests.get(proxy_target(op, path), params=list(request.query_params.multi_items()),
                                     headers=headers, auth=auth, timeout=settings.MONAI_LABEL_DICOMWEB_PROXY_TIMEOUT)
            except requests.RequestException as e:
                raise HTTPException(status_code=502, detail=f"DICOMweb server: {type(e).__name__}") from None
            return Response(content=reply.content, status_code=reply.status_code,
                            headers={k: v for k, v in reply.headers.items() if k.lower() in RETURNED_HEADERS})

        def route_for(op: str):
            def raps3d_proxy(request: Request, path: str,
                             user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER))):
                return proxy(request, op, path)

            return APIRoute(f"{api}/proxy/dicom/{op}/{{path:path}}", raps3d_proxy, methods=["GET"],
                            name="raps3d_proxy", include_in_schema=False)

        routes += [route_for("qido"), route_for("wado")]

    if "raps3d_proxy_checked" not in names and remote:
        from monailabel.endpoints.proxy import proxy_dicom

        # Every other proxied request (POST, i.e. STOW; GET of stow/ or of a path without a service; Google's
        # DICOMweb) still goes to MONAI Label's proxy, after the same path check.
        async def raps3d_proxy_checked(request: Request, path: str,
                                       user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER))):
            op, _, rest = path.partition("/")
            if op not in ("qido", "wado", "stow"):
                op, rest = "", path
            check_proxy_path(rest)
            return await proxy_dicom(request, op, rest)

        routes.append(APIRoute(f"{api}/proxy/dicom/{{path:path}}", raps3d_proxy_checked, methods=["GET", "POST"],
                               name="raps3d_proxy_checked", include_in_schema=False))

    for route in reversed(routes):
        fastapi_app.router.routes.insert(0, route)
    installed = [r.path for r in routes]
    if installed:
        logger.info(f"Raps-3D: routes placed before MONAI Label's: {installed}")
    return installed
