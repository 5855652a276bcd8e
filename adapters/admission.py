"""Everything checked before an expert is activated: name, where its files come from, size, fit.

Files are staged in the store's staging area; nothing is registered until every check
passed, and a refusal deletes the staging folder, so a failed registration leaves nothing.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Collection

from pydantic import ValidationError

from adapters.lora import (
    CONFIG_FILE,
    METADATA_FILE,
    WEIGHTS_FILE,
    AdapterError,
    BaseShape,
    LoraWeights,
    load_lora,
    refuse_pickled,
)
from adapters.names import check_adapter_name

log = logging.getLogger("loraplex.adapters")


class AdmissionError(Exception):
    """A refusal with the HTTP status that says why (400 bad input, 403, 409 taken, 413 too big)."""

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param


def check_new_name(name: str, reserved: Collection[str]) -> None:
    """A valid expert name that is not the base's nor one of the router's ("auto")."""
    try:
        check_adapter_name(name)
    except ValueError as exc:
        raise AdmissionError(400, str(exc), "name") from None
    if name in reserved:
        raise AdmissionError(400, f"'{name}' is reserved (the base model's name or a router name such as 'auto'); "
                                  "choose another", "name")


def name_taken(name: str) -> AdmissionError:
    return AdmissionError(409, f"an adapter named '{name}' is already registered; DELETE it first or pick another name",
                          "name")


def check_token_ids(ids, vocab_size: int, param: str) -> None:
    """Every id names a token of the vocabulary (the one check for stop_token_ids, logit_bias, prompt ids)."""
    bad = sorted(i for i in ids if not 0 <= i < vocab_size)
    if bad:
        raise AdmissionError(400, f"{param} names tokens {bad[:5]} outside the vocabulary (0..{vocab_size - 1})",
                             param)


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _check_size(path: Path, limit: int) -> None:
    size = path.stat().st_size
    if size > limit:
        raise AdmissionError(413, f"{path.name} is {size} bytes, over the limit of {limit} bytes", "path")


MAX_PATH_CHARS = 4096  # PATH_MAX on Linux


def stage_from_path(path: str, roots: list[str], staging: Path, max_bytes: int) -> None:
    """Copy a server-side adapter folder into staging, if (after symlinks) it lies inside a root.

    Its files must be plain files with one name: a symlink or a hard link could make a file
    from outside the roots look as if it were inside.
    """
    if not roots:
        raise AdmissionError(403, "registration by path is disabled: set adapter_roots (LORAPLEX_ADAPTER_ROOTS)", "path")
    if "\0" in path or len(path) > MAX_PATH_CHARS:
        raise AdmissionError(400, f"path must be at most {MAX_PATH_CHARS} characters with no NUL byte", "path")
    real_roots = [os.path.realpath(root) for root in roots]
    try:
        _stage_inside_roots(path, real_roots, roots, staging, max_bytes)
    except OSError as exc:  # e.g. a component too long, or not readable
        raise AdmissionError(400, f"path {path!r} cannot be read: {exc.strerror}", "path") from None


def _stage_inside_roots(path: str, real_roots: list[str], roots: list[str], staging: Path, max_bytes: int) -> None:
    real = os.path.realpath(path)
    if not any(_inside(real, root) for root in real_roots):
        raise AdmissionError(400, f"path {path!r} is outside the adapter roots {roots}", "path")
    folder = Path(real)
    if not folder.is_dir():
        raise AdmissionError(400, f"path {path!r} is not a folder", "path")
    try:
        refuse_pickled(folder)
    except AdapterError as exc:
        raise AdmissionError(400, str(exc), "path") from None
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        source = folder / name
        if not source.is_file():
            raise AdmissionError(400, f"{path!r} has no {name}", "path")
        # a file may itself be a link out of the root
        if not any(_inside(os.path.realpath(source), root) for root in real_roots):
            raise AdmissionError(400, f"{name} in {path!r} links outside the adapter roots", "path")
        if source.stat().st_nlink > 1:
            raise AdmissionError(400, f"{name} in {path!r} is a hard link (it may be a file from outside the adapter "
                                      "roots); copy the file instead", "path")
        _check_size(source, max_bytes)
        shutil.copyfile(source, staging / name)


def stage_upload(config_bytes: bytes, weights_bytes: bytes, staging: Path, max_bytes: int) -> None:
    if len(weights_bytes) > max_bytes:
        raise AdmissionError(413, f"{WEIGHTS_FILE} is over the limit of {max_bytes} bytes", "adapter_model")
    if weights_bytes[:2] in (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05") or weights_bytes[:2] == b"PK":
        raise AdmissionError(400, "the weights look like a pickle / torch.save file; upload safetensors", "adapter_model")
    (staging / CONFIG_FILE).write_bytes(config_bytes)
    (staging / WEIGHTS_FILE).write_bytes(weights_bytes)


def _base_name_matches(claimed: str, base_names: set[str]) -> bool:
    return Path(claimed.rstrip("/")).name.lower() in {name.lower() for name in base_names}


def validate_staged(staging: Path, shape: BaseShape, max_rank: int, base_names: set[str], base_mismatch: str) -> LoraWeights:
    """Read the staged adapter and check it fits the served base. Raises AdmissionError (400)."""
    try:
        weights = load_lora(staging, shape, max_rank=max_rank)
    except AdapterError as exc:
        raise AdmissionError(400, str(exc)) from None
    claimed = weights.base_model_name_or_path
    if claimed and not _base_name_matches(claimed, base_names):
        message = f"adapter was trained on '{claimed}', but this server serves {sorted(base_names)}"
        if base_mismatch == "refuse":
            raise AdmissionError(400, message + " (set base_mismatch: warn to accept it)")
        log.warning("%s; accepted because base_mismatch is 'warn'", message)
    return weights



METADATA_FIELDS = ("description", "examples", "negative_examples", "stop")


def folder_metadata(folder: str | Path) -> dict:
    """description/examples/negative_examples/stop from the folder's expert.json, if any (unreadable: ignored)."""
    path = Path(folder) / METADATA_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):
        return {}
    return {k: data[k] for k in METADATA_FIELDS if k in data} if isinstance(data, dict) else {}


def fill_from_folder(spec, folder: str | Path):
    """The spec, with fields it leaves empty taken from the adapter folder's expert.json.

    The merged spec is validated again, so expert.json passes the same checks as fields sent
    in the request (types, non-empty stops, encodable text); a bad file is a 400 naming it.
    """
    found = folder_metadata(folder)
    update = {k: v for k, v in found.items() if not getattr(spec, k)}
    if not update:
        return spec
    try:
        return type(spec).model_validate({**spec.model_dump(), **update})
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"])
        raise AdmissionError(400, f"{METADATA_FILE} in the adapter folder: {where + ': ' if where else ''}"
                                  f"{error['msg'].removeprefix('Value error, ')}", "path") from None
