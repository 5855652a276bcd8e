"""Schemathesis hooks for tests/test_fuzz.py (loaded through SCHEMATHESIS_HOOKS).

Random `model` strings name nothing, so almost every generated completion would stop at a 404
and the fuzzer would never reach routing, sampling or streaming. These hooks swap about two in
three generated names for ones the server serves (the base, an expert, "auto"), deterministically
from the generated value, so a seeded run is reproducible. Only a non-empty string is replaced, and by
another non-empty string, so a case that was invalid stays invalid.
"""
import os
import zlib

import schemathesis

MODELS = os.environ.get("LORAPLEX_FUZZ_MODELS", "").split(",")
NAME_FIELDS = ("model", "model_id", "name")


def _steer(value: str) -> str:
    choice = zlib.crc32(value.encode("utf-8", "surrogatepass")) % (len(MODELS) + 1)
    return MODELS[choice] if choice < len(MODELS) else value


def _steer_fields(container):
    if isinstance(container, dict):
        for field in NAME_FIELDS:
            if isinstance(container.get(field), str) and container[field]:  # "" stays: it is the invalid case
                container[field] = _steer(container[field])
    return container


@schemathesis.hook
def map_body(ctx, body):
    if ctx.operation is not None and ctx.operation.path == "/v1/adapters":
        return body  # registration names are new names: leave them random
    return _steer_fields(body)


@schemathesis.hook
def map_path_parameters(ctx, path_parameters):
    return _steer_fields(path_parameters)
