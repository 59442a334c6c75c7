"""`/docs` served from the package: Swagger UI's files come from `swagger-ui-bundle-v2` (Swagger UI 5,
Apache-2.0; the same files as the `swagger-ui-dist` release), the operator page's from
`service/static`. FastAPI's own `/docs` loads Swagger UI from a CDN and is blank offline; its
`/redoc` too, so both are turned off in `create_app` and this router takes `/docs`.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from fastapi import APIRouter, FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

__all__ = ["SWAGGER_PREFIX", "UI_PREFIX", "mount_static", "router"]

router = APIRouter(include_in_schema=False)

SWAGGER_PREFIX = "/static/swagger"
UI_PREFIX = "/static/ui"
#: Swagger UI options: no call to validator.swagger.io (it would leave the machine)
SWAGGER_PARAMETERS = {"validatorUrl": None}


def _swagger_dir() -> Path:
    from swagger_ui_bundle import swagger_ui_path

    return Path(str(swagger_ui_path))


def mount_static(app: FastAPI) -> None:
    """Serve the page's and Swagger UI's assets (no data in them, so no token needed)."""
    app.mount(UI_PREFIX, StaticFiles(directory=str(resources.files("quantgate.service").joinpath("static"))), name="ui-static")
    app.mount(SWAGGER_PREFIX, StaticFiles(directory=str(_swagger_dir())), name="swagger-static")


@router.get("/docs")
def swagger_ui(request: Request) -> HTMLResponse:
    """Interactive API docs, every asset from this server."""
    return get_swagger_ui_html(
        openapi_url=request.app.openapi_url or "/openapi.json",
        title=f"{request.app.title} API",
        swagger_js_url=f"{SWAGGER_PREFIX}/swagger-ui-bundle.js",
        swagger_css_url=f"{SWAGGER_PREFIX}/swagger-ui.css",
        swagger_favicon_url=f"{SWAGGER_PREFIX}/favicon-32x32.png",
        swagger_ui_parameters=SWAGGER_PARAMETERS,
    )
