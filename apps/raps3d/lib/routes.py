"""Routes the app places before MONAI Label's own, in MONAI Label's FastAPI app (FastAPI takes the first match)."""

from fastapi.routing import APIRoute


def put_first(route: APIRoute, fastapi_app=None) -> bool:
    """Puts ``route`` before every other route; False when a route of that name is there already."""
    if fastapi_app is None:
        from monailabel.app import app as fastapi_app
    if any(getattr(r, "name", "") == route.name for r in fastapi_app.router.routes):
        return False
    fastapi_app.router.routes.insert(0, route)
    return True
