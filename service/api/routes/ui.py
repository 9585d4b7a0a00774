"""/ui: one page for watching backpropagation happen, served from the package.

The page is static (``service/api/ui/``: HTML, two scripts, one stylesheet, an icon) and talks
to the API from the browser with the caller's key. It is open, like /docs: it holds no data,
and every call it makes carries the key typed into it. The Content-Security-Policy allows
nothing but this origin, and no inline script or style, so a value that reaches the page
(a session's name, say) cannot run as code even if the page had a bug that let it through.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from service.errors import NotFound

router = APIRouter(include_in_schema=False)

UI_DIR = Path(__file__).resolve().parents[1] / "ui"
# Only these names are served: no path from the request ever reaches the file system.
ASSETS = {
    "ui.js": "text/javascript; charset=utf-8",
    "graph.js": "text/javascript; charset=utf-8",
    "ui.css": "text/css; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}
CSP = "; ".join(
    (
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",
        "connect-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    )
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # Revalidate every time (the ETag makes that cheap): an upgrade shows at once.
    "Cache-Control": "no-cache",
}


@router.get("/ui")
async def page() -> FileResponse:
    return FileResponse(
        UI_DIR / "index.html", media_type="text/html; charset=utf-8", headers=HEADERS
    )


@router.get("/ui/static/{name}")
async def asset(name: str) -> FileResponse:
    media_type = ASSETS.get(name)
    if media_type is None:
        raise NotFound(f"no UI asset {name[:64]!r}")
    return FileResponse(UI_DIR / name, media_type=media_type, headers=HEADERS)
