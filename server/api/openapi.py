"""The OpenAPI document, made to say what the server really does.

FastAPI's generated document lists a 422 the server never sends (validation errors are 400
here, in OpenAI's shape), none of the errors it does send, `/metrics` as JSON, and no body for
`POST /v1/adapters` (read by hand: JSON or a multipart upload). This fills in each operation's
real error statuses with the error schema, the real content types and the upload's schema;
the fuzz test (tests/test_fuzz.py) holds the server to this document.
"""
from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {
        "type": "object",
        "required": ["message", "type", "param", "code"],
        "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                       "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}},
    }},
}
_WHY = {400: "Invalid request", 401: "Missing or wrong key", 403: "Disabled (no admin key configured)",
        404: "Unknown model, expert or adapter", 408: "The request body stalled", 409: "Name already registered, or an expert a mixture blends",
        413: "Request body too large", 429: "Queue full; retry after Retry-After",
        500: "This request's generation failed (the server goes on)",
        502: "The expert's adapter source failed or cannot be reached (adapter_sources)",
        503: "Loading, shutting down, or an adapter could not be loaded; retry after Retry-After",
        504: "Fetching the expert from its adapter source took too long (adapter_fetch_timeout_s)"}
_INFERENCE = (400, 401, 404, 408, 413, 429, 500, 502, 503, 504)
_ADMIN = (401, 403, 503)
ERRORS: dict[tuple[str, str], tuple[int, ...]] = {
    ("get", "/metrics"): (401, 403),
    ("get", "/v1/models"): (401, 503),
    ("get", "/v1/models/{model_id}"): (401, 404, 503),
    ("post", "/v1/route"): (400, 401, 404, 408, 413, 502, 503, 504),
    ("post", "/v1/chat/completions"): _INFERENCE,
    ("post", "/v1/completions"): _INFERENCE,
    ("get", "/v1/adapters"): _ADMIN,
    ("post", "/v1/adapters"): (400, 408, 409, 413, *_ADMIN),
    ("get", "/v1/adapters/{name}"): (404, *_ADMIN),
    ("delete", "/v1/adapters/{name}"): (400, 404, 409, *_ADMIN),
    ("post", "/v1/router/corrections"): (400, 404, 408, 413, *_ADMIN),
    ("post", "/v1/load_lora_adapter"): (400, 408, 409, 413, *_ADMIN),
    ("post", "/v1/unload_lora_adapter"): (400, 404, 408, 409, 413, *_ADMIN),
    ("post", "/v1/files"): (400, 404, 408, 413, *_ADMIN),
    ("get", "/v1/files"): (404, *_ADMIN),
    ("get", "/v1/files/{file_id}"): (404, *_ADMIN),
    ("get", "/v1/files/{file_id}/content"): (404, *_ADMIN),
    ("delete", "/v1/files/{file_id}"): (404, *_ADMIN),
    ("post", "/v1/fine_tuning/jobs"): (400, 404, 408, 413, *_ADMIN),
    ("get", "/v1/fine_tuning/jobs"): (400, 404, *_ADMIN),
    ("get", "/v1/fine_tuning/jobs/{job_id}"): (404, *_ADMIN),
    ("post", "/v1/fine_tuning/jobs/{job_id}/cancel"): (400, 404, *_ADMIN),
    ("get", "/v1/fine_tuning/jobs/{job_id}/events"): (400, 404, *_ADMIN),
    ("get", "/v1/fine_tuning/jobs/{job_id}/checkpoints"): (400, 404, *_ADMIN),
}
_TEXT = {"type": "string"}
# one server-sent event: `data` is a JSON chunk (or an error object, or "[DONE]")
_SSE_EVENT = {"type": "object", "required": ["data"], "properties": {"data": _TEXT, "event": _TEXT}}
_UPLOAD_FORM = {
    "type": "object",
    "required": ["name", "adapter_config", "adapter_model"],
    "properties": {
        "name": _TEXT,
        "adapter_config": {"type": "string", "format": "binary", "description": "adapter_config.json"},
        "adapter_model": {"type": "string", "format": "binary", "description": "adapter_model.safetensors"},
        "description": _TEXT,
        "examples": {"type": "string", "description": "a JSON list of strings, or the field repeated"},
        "stop": {"type": "string", "description": "a JSON list of strings, or the field repeated"},
        "stop_token_ids": {"type": "string", "description": "a JSON list of token ids, or the field repeated"},
        "temperature": {"type": "string", "description": "a number in [0, 2]"},
        "top_p": {"type": "string", "description": "a number in (0, 1]"},
        "max_tokens": {"type": "string", "description": "a positive integer"},
    },
}


def _document(app: FastAPI, registration_schema: dict) -> dict:
    schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components.pop("HTTPValidationError", None)
    components.pop("ValidationError", None)
    components["Error"] = ERROR_SCHEMA
    components["AdapterRegistration"] = registration_schema
    error_ref = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            responses = operation.setdefault("responses", {})
            responses.pop("422", None)
            for status in ERRORS.get((method, path), ()):
                responses[str(status)] = {"description": _WHY[status], "content": error_ref}
    paths = schema["paths"]
    paths["/metrics"]["get"]["responses"]["200"]["content"] = {"text/plain": {"schema": _TEXT}}
    paths["/health"]["get"]["responses"]["503"] = {
        "description": "Loading, draining or failed",
        "content": {"application/json": {"schema": {"type": "object", "properties": {"status": _TEXT}}}}}
    for path in ("/v1/chat/completions", "/v1/completions"):
        paths[path]["post"]["responses"]["200"]["content"]["text/event-stream"] = {"schema": _SSE_EVENT}
    paths["/v1/files"]["post"]["requestBody"] = {"required": True, "content": {"multipart/form-data": {"schema": {
        "type": "object", "required": ["file", "purpose"],
        "properties": {"file": {"type": "string", "format": "binary", "description": "chat JSONL"},
                       "purpose": {"type": "string", "enum": ["fine-tune"]}}}}}}
    paths["/v1/files/{file_id}/content"]["get"]["responses"]["200"]["content"] = {"application/jsonl": {"schema": _TEXT}}
    for path in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"):  # vLLM answers these in plain text
        paths[path]["post"]["responses"]["200"]["content"] = {"text/plain": {"schema": _TEXT}}
    paths["/v1/adapters"]["post"]["requestBody"] = {"required": True, "content": {
        "application/json": {"schema": {"$ref": "#/components/schemas/AdapterRegistration"}},
        "multipart/form-data": {"schema": _UPLOAD_FORM},
    }}
    return schema


def install_openapi(app: FastAPI, registration_model) -> None:
    """Serve the corrected document at /openapi.json (built once, on first request)."""

    def openapi() -> dict:
        if app.openapi_schema is None:
            registration = registration_model.model_json_schema(ref_template="#/components/schemas/{model}")
            app.openapi_schema = _document(app, registration)
        return app.openapi_schema

    app.openapi = openapi
