"""GET /: the page that tries every modality in a browser (static files, no build step)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

WEB_DIR = Path(__file__).resolve().parents[1] / "web"
STATIC_PREFIX = "/web"

# Everything the page loads comes from this origin. Blob URLs hold what the user picked and the
# API's answers; the splat viewer's sort worker is a blob and compiles WebAssembly.
CSP = ("default-src 'self'; img-src 'self' blob: data:; media-src 'self' blob:; "
       "worker-src 'self' blob:; script-src 'self' 'wasm-unsafe-eval'; style-src 'self'; "
       "connect-src 'self' blob: data:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'")
PAGE_HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
                "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"}

router = APIRouter(include_in_schema=False)


@router.get("/")
def page() -> FileResponse:
    return FileResponse(WEB_DIR / "index.html", media_type="text/html; charset=utf-8", headers=PAGE_HEADERS)


class _StaticFiles(StaticFiles):
    """Page assets with the same headers as the page (the JS modules run under its CSP)."""

    def file_response(self, *args, **kwargs):
        response = super().file_response(*args, **kwargs)
        response.headers.update({k: v for k, v in PAGE_HEADERS.items() if k != "Cache-Control"})
        return response


def mount(app) -> None:
    app.include_router(router)
    app.mount(STATIC_PREFIX, _StaticFiles(directory=WEB_DIR), name="web")
