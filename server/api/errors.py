"""Errors in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""
from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from adapters.admission import AdmissionError
from router.resolve import BadMixture, UnknownExpert
from server.tenants.store import TenantError

log = logging.getLogger("loraplex.http")

_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    502: "server_error",
    503: "server_error",
    504: "server_error",
}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": _TYPE_BY_STATUS.get(status, "server_error"), "param": param,
                      "code": code}}


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


async def send_error(send, status: int, message: str, param: str | None = None, code: str | None = None,
                     headers: dict[str, str] | None = None) -> None:
    """The same error, sent by ASGI middleware that answers before the app runs (auth, body limits)."""
    await error_response(status, message, param, code, headers)({"type": "http"}, None, send)


_WHERE = ("body", "query", "path", "header", "cookie")  # FastAPI's first location part: where, not which


def validation_message(exc: RequestValidationError | ValidationError) -> tuple[str, str | None]:
    """(message, param) from the first problem pydantic found; the location names the field."""
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    # a parameter as OpenAI names it: `limit`, not `query.limit` (nor `body.model`)
    loc = [str(part) for i, part in enumerate(first.get("loc", ())) if not (i == 0 and part in _WHERE)]
    if first.get("type") == "json_invalid":
        return "The request body is not valid JSON.", None
    param = ".".join(loc) or None
    where = f"'{param}': " if param else ""
    extra = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")  # pydantic's prefix says nothing
    return f"{where}{message}{extra}", param


def _allowed_methods(request: Request) -> list[str]:
    """The methods some route of the app answers on this path (asked the router itself, method by method)."""
    routes = request.app.router.routes
    return [method for method in ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT")
            if any(route.matches({**request.scope, "method": method})[0] == Match.FULL for route in routes)]


# OpenAI endpoints a client may try that this server does not serve (it serves one base and its experts
# for generation): named, so the answer says "not served here" rather than "no such path"
_NOT_SERVED = {"/v1/embeddings": "embeddings", "/v1/moderations": "moderations", "/v1/images": "images",
               "/v1/audio": "audio", "/v1/assistants": "assistants", "/v1/threads": "threads",
               "/v1/vector_stores": "vector stores", "/v1/realtime": "realtime sessions"}


def _unknown_path_message(path: str) -> str:
    for prefix, what in _NOT_SERVED.items():
        if path == prefix or path.startswith(prefix + "/"):
            return (f"This server does not serve {what} ({path}). It serves chat and text completions "
                    "and responses (/v1/chat/completions, /v1/completions, /v1/responses, and /v1/batches of "
                    "them) from its base model and experts; GET /v1/models lists them.")
    return f"Unknown URL: {path}. See /docs or /openapi.json for the endpoints this server answers."


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return error_response(exc.status, exc.message, exc.param, exc.code, exc.headers)

    @app.exception_handler(AdmissionError)
    async def _refused(request: Request, exc: AdmissionError):
        return error_response(exc.status, exc.message, exc.param, exc.code)

    @app.exception_handler(TenantError)
    async def _tenant_refused(request: Request, exc: TenantError):
        return error_response(exc.status, exc.message, exc.param, exc.code)

    @app.exception_handler(UnknownExpert)
    async def _unknown_expert(request: Request, exc: UnknownExpert):
        return error_response(404, f"The model or expert '{exc.name}' does not exist. GET /v1/models lists the base "
                                   "and the registered experts.", exc.param, "model_not_found")

    @app.exception_handler(BadMixture)
    async def _bad_mixture(request: Request, exc: BadMixture):
        return error_response(400, f"Invalid mixture of experts: {exc}.", exc.param, "invalid_mixture")

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        message, param = validation_message(exc)
        return error_response(400, message, param, "invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status_code == 405:  # every method of the path, not only those of the first route that matched it
            allowed = _allowed_methods(request)
            headers["Allow"] = ", ".join(allowed)
            return error_response(405, f"{request.method} is not allowed on {request.url.path}; it answers "
                                       f"{', '.join(allowed)}.", None, "method_not_allowed", headers)
        if exc.status_code == 404 and exc.detail == "Not Found":  # no route: say so, and what is not served
            return error_response(404, _unknown_path_message(request.url.path), None, "unknown_url", headers)
        return error_response(exc.status_code, str(exc.detail), None, None, headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return error_response(500, "internal server error", None, "internal_error")
