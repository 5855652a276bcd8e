"""Everything checked before an expert is activated: name, where its files come from, size, fit.

Files are staged in the store's staging area; nothing is registered until every check
passed, and a refusal deletes the staging folder, so a failed registration leaves nothing.
"""
from __future__ import annotations

import io
import json
import logging
import os
import shutil
import stat
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
from adapters.names import check_adapter_name, check_source_name

log = logging.getLogger("loraplex.adapters")


class AdmissionError(Exception):
    """A refusal with the HTTP status that says why (400 bad input, 403, 404 no such expert, 409 taken or
    in use, 413 too big), and the error code a client can branch on."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code


def check_new_name(name: str, reserved: Collection[str], nested: bool = False) -> None:
    """A valid expert name that is not the base's nor one of the router's ("auto"). `nested`: a name an
    adapter source resolved, which may join parts with '/' (adapters/names.py)."""
    try:
        (check_source_name if nested else check_adapter_name)(name)
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


MAX_PATH_CHARS = 4096  # PATH_MAX on Linux
MAX_METADATA_BYTES = 1_000_000  # expert.json: a description, examples and stops


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
    for name, limit in ((CONFIG_FILE, max_bytes), (WEIGHTS_FILE, max_bytes), (METADATA_FILE, MAX_METADATA_BYTES)):
        source = folder / name
        if name == METADATA_FILE and not os.path.lexists(source):
            continue  # optional: the request's fields are all there is
        if not os.path.lexists(source):
            raise AdmissionError(400, f"{path!r} has no {name}", "path")
        _copy_checked(source, staging / name, real_roots, limit, f"{name} in {path!r}")


def _copy_checked(source: Path, target: Path, real_roots: list[str], limit: int, what: str) -> None:
    """Copy one file of an adapter folder, if it is what it claims to be: a regular file inside the
    roots (a symlink may point within them, not out), with one name (a hard link could be a file from
    outside), of at most `limit` bytes. Checked on the open file itself, so a file swapped in after
    the check is not read, and a FIFO or device cannot block the registration. Messages name the
    file, never its content."""
    real = os.path.realpath(source)
    if not any(_inside(real, root) for root in real_roots):
        raise AdmissionError(400, f"{what} links outside the adapter roots", "path")
    fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise AdmissionError(400, f"{what} is not a regular file", "path")
        if info.st_nlink > 1:
            raise AdmissionError(400, f"{what} is a hard link (it may be a file from outside the adapter "
                                      "roots); copy the file instead", "path")
        if info.st_size > limit:
            raise AdmissionError(413, f"{what} is {info.st_size} bytes, over the limit of {limit} bytes", "path")
        with open(target, "wb") as out:
            copied = _copy_at_most(handle, out, limit)
        if copied > limit:  # it grew after the check
            raise AdmissionError(413, f"{what} is over the limit of {limit} bytes", "path")


def _copy_at_most(source, target, limit: int, chunk: int = 1 << 20) -> int:
    """Copy up to limit + 1 bytes (enough to tell the file is over the limit); the bytes copied."""
    copied = 0
    while copied <= limit:
        data = source.read(min(chunk, limit + 1 - copied))
        if not data:
            break
        target.write(data)
        copied += len(data)
    return copied


def stage_upload(config, weights, staging: Path, max_bytes: int) -> None:
    """Write the two uploaded files into staging. Each is bytes or a binary file (an upload spooled to
    disk), copied in chunks so a large one is never held in memory whole."""
    for source, name, param in ((config, CONFIG_FILE, "adapter_config"), (weights, WEIGHTS_FILE, "adapter_model")):
        if isinstance(source, (bytes, bytearray)):
            source = io.BytesIO(source)
        source.seek(0)
        head = source.read(2)
        if name == WEIGHTS_FILE and head in (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05", b"PK"):
            raise AdmissionError(400, "the weights look like a pickle / torch.save file; upload safetensors", param)
        source.seek(0)
        with open(staging / name, "wb") as out:
            if _copy_at_most(source, out, max_bytes) > max_bytes:
                raise AdmissionError(413, f"{name} is over the limit of {max_bytes} bytes", param)


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
    """description/examples/negative_examples/stop from the folder's expert.json, if any (unreadable,
    not a regular file, or over MAX_METADATA_BYTES: ignored)."""
    try:
        fd = os.open(Path(folder) / METADATA_FILE, os.O_RDONLY | os.O_NONBLOCK)
        with os.fdopen(fd, "rb") as handle:
            if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
                return {}
            raw = handle.read(MAX_METADATA_BYTES + 1)
        if len(raw) > MAX_METADATA_BYTES:
            return {}
        data = json.loads(raw.decode("utf-8"))
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
