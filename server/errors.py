"""OpenAI-shaped errors: `{"error": {"message", "type", "param", "code"}}` with the right status.

Every failure a client can cause maps to a 4xx here; FastAPI's 422 validation errors become 400,
as OpenAI returns them.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("deltamem.server")

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 409: "conflict_error", 413: "invalid_request_error",
          429: "rate_limit_error", 503: "service_unavailable_error", 507: "insufficient_storage_error"}


class APIError(Exception):
    """An error with an HTTP status that the handlers render in OpenAI's shape."""

    def __init__(self, status: int, message: str, *, code: str | None = None, param: str | None = None,
                 type: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.type = type or _TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": redact_paths(self.message), "type": self.type, "param": self.param,
                          "code": self.code}}


# an absolute filesystem path (two components or more), but not one of our own URL paths
_PATH = re.compile(r"(?<![\w/.])/(?!v1/)(?:[^\s'\",:;()\[\]]+/)+[^\s'\",:;()\[\]]*")


def redact_paths(message: str) -> str:
    """Client-facing messages never show where the server keeps its files (the log has them)."""
    return _PATH.sub("<path>", message)


def bad_request(message: str, *, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def not_found(message: str, *, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(404, message, param=param, code=code)


def conflict(message: str, *, code: str | None = None, param: str | None = None) -> APIError:
    return APIError(409, message, code=code, param=param)


def error_response(err: APIError) -> JSONResponse:
    if err.status >= 500:
        log.warning("%d %s: %s", err.status, err.code, err.message)
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def _validation_error(exc: RequestValidationError, content_type: str | None = None) -> APIError:
    errors = exc.errors()
    if not errors:
        return bad_request("invalid request")
    first = errors[0]
    if tuple(first.get("loc", ())) == ("body",) and isinstance(first.get("input"), (bytes, str)) and \
            "json" not in (content_type or ""):   # FastAPI parses JSON only when the type says so
        return bad_request(f"the request body must be JSON sent with Content-Type: application/json (got "
                           f"{content_type or 'no Content-Type'})", code="invalid_content_type")
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path", "header")]
    if first.get("type") == "json_invalid":
        ctx = first.get("ctx") or {}
        return bad_request(f"request body is not valid JSON: {ctx.get('error', first.get('msg'))}", code="invalid_json")
    # a model-level check names its field in ctx["param"], relative to where the model sits
    param = ".".join(loc + [str((first.get("ctx") or {})["param"])] if "param" in (first.get("ctx") or {}) else loc)
    param = param or None
    msg = first.get("msg", "invalid value")
    kind = first.get("type")
    if kind == "extra_forbidden":
        return bad_request(f"unsupported parameter: {param!r} is not implemented by this server",
                           param=param, code="unsupported_parameter")
    if kind == "unsupported_parameter":
        return bad_request(msg, param=param, code="unsupported_parameter")
    if kind == "missing":
        what = f"parameter: {param!r}" if param else "request body (JSON)"
        return bad_request(f"missing required {what}", param=param, code="missing_required_parameter")
    where = f"{param}: " if param else ""
    return bad_request(f"{where}{msg}", param=param, code="invalid_value")


def install_error_handlers(app: FastAPI) -> None:
    """Render every error in OpenAI's shape; nothing a client sends may produce a 500."""

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(_validation_error(exc, request.headers.get("content-type")))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        msg = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return error_response(APIError(exc.status_code, msg, code=code, headers=getattr(exc, "headers", None)))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return error_response(APIError(500, f"internal server error: {type(exc).__name__}", type="server_error",
                                       code="internal_error"))
