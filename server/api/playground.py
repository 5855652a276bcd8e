"""The web playground: static files at `/` (index.html) and `/ui/...` (script, styles).

Why static and hand-written: it must work offline and with no build step at install or run time, and
it only talks to the server's public API (chat completions, /v1/route, /v1/adapters, /metrics), so it
is also a worked example of using that API from a browser. Keys typed into the page stay in the page's
memory and go out only as bearer headers; the Content-Security-Policy allows nothing but this origin.
`ui: false` leaves both paths unrouted (404).
"""
from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

UI_DIR = Path(__file__).resolve().parent / "ui"
HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
                               "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


class _Static(StaticFiles):
    async def get_response(self, path, scope):
        response = await super().get_response(path, scope)
        response.headers.update(HEADERS)
        return response


def install_playground(app: FastAPI) -> None:
    @app.get("/", include_in_schema=False)
    async def playground():
        return FileResponse(UI_DIR / "index.html", headers=HEADERS)

    app.mount("/ui", _Static(directory=UI_DIR), name="ui")
