"""One error shape for every failure: {"error": {"code", "message", "details"}}.

Clients branch on `code`, which is stable; `message` is for people. FastAPI's own validation
errors and Starlette's HTTP errors are remapped to the same shape, the serving layer's refusals
(Rejected) become 503 with Retry-After, and nothing a client sends reaches a 500: only a failure of
the server itself does. ERROR_RESPONSES documents every status in the OpenAPI schema.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from romebert.service.schemas import ErrorResponse
from romebert.service.tickets import EngineFailure, Rejected

log = logging.getLogger("romebert.errors")

# Codes for the HTTP errors Starlette and FastAPI raise themselves.
_STATUS_CODES = {400: "bad_request", 404: "not_found", 405: "method_not_allowed", 413: "body_too_large", 415: "unsupported_media_type"}


def _doc(description: str) -> dict[str, Any]:
    return {"model": ErrorResponse, "description": description}


RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "integer", "minimum": 1}}}
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: _doc("the body is not valid JSON: malformed, not UTF-8, a lone surrogate escape, nested too deeply (bad_request)"),
    408: _doc("the headers or the body did not arrive in time (request_timeout); the connection is closed"),
    413: _doc("more texts than the server's limit (too_many_items) or a body over its byte limit (body_too_large)"),
    415: _doc("the body is not declared as JSON: send Content-Type: application/json (unsupported_media_type)"),
    422: _doc("invalid input (invalid_request); details name each field"),
    503: _doc("overloaded, loading, draining or failing (overloaded, not_ready, shutting_down, model_failed, "
              "worker_failed, deadline_exceeded)") | {"headers": RETRY_AFTER},
}


class ApiError(StarletteHTTPException):
    """An error answered as-is. A Starlette HTTPException so that FastAPI lets it through even
    when it is raised while the request body is being read (see the request guard)."""

    def __init__(self, status: int, code: str, message: str, details: Any = None, headers: dict[str, str] | None = None):
        super().__init__(status_code=status, detail=message, headers=headers)
        self.code = code
        self.details = details


def error_body(code: str, message: str, details: Any = None) -> dict[str, Any]:
    """The one shape of every error answer (ErrorResponse), whichever layer sends it."""
    return {"error": {"code": code, "message": message, "details": details}}


def error_response(status: int, code: str, message: str, details: Any = None, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(code, message, details), status_code=status, headers=headers)


def _wrong_form(err: dict[str, Any]) -> bool:
    """`text` is a string or a list, and pydantic reports what each form thinks of the input; the
    form that only says "not a string" of a list (or "not a list" of a string) is not the one the
    client sent, and its complaint hides the real one."""
    kind, value = err.get("type"), err.get("input")
    return (kind == "string_type" and isinstance(value, list)) or (kind == "list_type" and isinstance(value, str))


def validation_details(errors: list[dict[str, Any]], fields: tuple[str, ...]) -> list[dict[str, str]]:
    """pydantic's errors as [{field, message, type}]; `field` is e.g. "text[2]", without the
    "body" prefix and the union-member tags ("str", "list[str]") pydantic puts in locations. A
    field's wrong-form complaints are left out when it has another error. A field the body may not
    have is answered with the ones it may (`fields`): a misspelt option is then a fix away."""
    locs = [[part for part in err.get("loc", ()) if part != "body"] for err in errors]
    explained = {loc[0] for loc, err in zip(locs, errors) if loc and not _wrong_form(err)}
    details = []
    for loc, err in zip(locs, errors):
        if _wrong_form(err) and loc and loc[0] in explained:
            continue
        if loc and isinstance(loc[0], str):
            field = loc[0] + "".join(f"[{part}]" for part in loc[1:] if isinstance(part, int))
        else:  # the body as a whole, e.g. a list where an object belongs
            field = "body"
        message = str(err.get("msg", "")).removeprefix("Value error, ")
        if err.get("type") == "string_pattern_mismatch":  # the one pattern: a text needs a non-blank character
            message = "empty or whitespace only"
        if err.get("type") == "extra_forbidden":
            message = f"not a field of this model's requests (they take {', '.join(fields)})"
        details.append({"field": field, "message": message, "type": str(err.get("type", ""))})
    return details


async def _api_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = getattr(exc, "code", None) or _STATUS_CODES.get(exc.status_code, "http_error")
    return error_response(exc.status_code, code, str(exc.detail), getattr(exc, "details", None), exc.headers)


async def _rejected(request: Request, exc: Rejected) -> JSONResponse:
    return error_response(503, exc.code, str(exc), headers={"Retry-After": exc.retry_after})


async def _client_left(request: Request, exc: ClientDisconnect) -> JSONResponse:
    """Nobody reads this answer: 499 (as nginx), so that the metrics count the request as cancelled
    by its client, not as a failure of the server."""
    return error_response(499, "client_closed_request", "the client closed the connection before its answer")


async def _engine_failure(request: Request, exc: EngineFailure) -> JSONResponse:
    return error_response(500, "engine_failure", str(exc))


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(500, "internal", "internal server error")


def install_error_handlers(app: FastAPI, request_fields: tuple[str, ...]) -> None:
    """`request_fields`: the fields POST /classify takes (they depend on the bundle), named in the
    answer to a body with any other."""

    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = list(exc.errors())
        unparseable = [e for e in errors if e.get("type") == "json_invalid"]
        if unparseable:  # pydantic's JSON parser: not JSON, not UTF-8, a lone surrogate, nested too deeply
            reason = str(unparseable[0].get("msg", "")).removeprefix("Invalid JSON: ")
            return error_response(400, "bad_request", f"the body is not valid JSON: {reason}")
        too_long = [e for e in errors if e.get("type") == "too_long" and e.get("loc", ())[1:2] in (("text",), ("text_pair",))]
        if too_long:  # a list over the item limit is "too large", as the contract says, not "invalid"
            limit = too_long[0].get("ctx", {}).get("max_length")
            return error_response(413, "too_many_items", f"more texts in one request than the limit of {limit}")
        details = validation_details(errors, request_fields)
        fields_by_message: dict[str, list[str]] = {}  # one complaint shared by several fields is said once
        for d in details:
            fields_by_message.setdefault(d["message"], []).append(d["field"])
        summary = "; ".join(f"{', '.join(fields)}: {message}" for message, fields in fields_by_message.items())
        return error_response(422, "invalid_request", f"invalid request: {summary}", details)

    app.add_exception_handler(StarletteHTTPException, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Rejected, _rejected)
    app.add_exception_handler(ClientDisconnect, _client_left)
    app.add_exception_handler(EngineFailure, _engine_failure)
    app.add_exception_handler(Exception, _unexpected)


async def answer_error(app: FastAPI, request: Request, exc: Exception) -> Response:
    """The answer the app's own exception handlers give `exc` (the handler of its nearest class),
    for a route handler called outside FastAPI's stack (middleware.DirectRoute); `Exception`'s handler
    catches what no other does, as FastAPI's outermost middleware would."""
    handlers = app.exception_handlers
    handler = next(handlers[kind] for kind in type(exc).__mro__ if kind in handlers)
    return await handler(request, exc)
