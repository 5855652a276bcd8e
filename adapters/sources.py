"""Where experts live before their first request: a folder tree, an S3-compatible bucket, a Hugging Face Hub
namespace.

A source copies one adapter's files (adapter_config.json, adapter_model.safetensors, and expert.json when
there is one) into a staging folder, each file streamed within a size limit and the whole within a
deadline. What happens to them next (the upload's admission checks, the store, the cache) belongs to the
Experts service (server/experts/sources.py); a source knows nothing of HTTP and raises SourceError, whose
kind says why (not found, too large, invalid, unreachable, timed out) in words a client may read: no
credentials, no server paths.

An adapter's name is its path under the source's root (a folder, a bucket prefix, a hub namespace), checked
by adapters.names.check_source_name before any source sees it: it cannot climb out of the root or be a URL.
"""
from __future__ import annotations

import fnmatch
import os
import stat
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from adapters.lora import CONFIG_FILE, METADATA_FILE, PICKLED_WEIGHTS_FILE, WEIGHTS_FILE

NOT_FOUND, TOO_LARGE, INVALID, UNREACHABLE, TIMEOUT = "not_found", "too_large", "invalid", "unreachable", "timeout"
MAX_METADATA_BYTES = 1_000_000  # expert.json: a description, examples and stops (as adapters.admission)
CHUNK = 1 << 20


class SourceError(Exception):
    """A fetch that did not bring an adapter; `kind` is one of NOT_FOUND ... TIMEOUT."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind
        self.message = message


class _Missing(Exception):
    """The file is not at the source (the caller decides what that means for the adapter)."""


@dataclass(frozen=True)
class FetchLimits:
    max_file_bytes: int  # adapter_config.json and adapter_model.safetensors each (max_adapter_bytes)
    timeout_s: float
    deadline: float  # time.monotonic() by which the whole fetch must be done

    @classmethod
    def starting_now(cls, max_file_bytes: int, timeout_s: float) -> "FetchLimits":
        return cls(max_file_bytes, timeout_s, time.monotonic() + timeout_s)

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def check_time(self, what: str) -> None:
        if self.remaining() <= 0:
            raise SourceError(TIMEOUT, f"fetching {what} took longer than the limit of {self.timeout_s:g} s "
                                       "(adapter_fetch_timeout_s)")


def stream_to(chunks: Iterable[bytes], target: Path, limit: int, limits: FetchLimits, what: str) -> int:
    """Write `chunks` to `target`, stopping past `limit` bytes or the deadline; the bytes written."""
    copied = 0
    with open(target, "wb") as out:
        for chunk in chunks:
            copied += len(chunk)
            if copied > limit:
                raise SourceError(TOO_LARGE, f"{what} is over the limit of {limit} bytes")
            out.write(chunk)
            limits.check_time(what)
    return copied


def _read_chunks(handle) -> Iterable[bytes]:
    while True:
        data = handle.read(CHUNK)
        if not data:
            return
        yield data


class AdapterSource(ABC):
    """One entry of `adapter_sources`: the names it may resolve (shell patterns, `*` crossing '/') and how
    it copies an adapter's files."""

    kind = ""

    def __init__(self, name: str, patterns: list[str]):
        self.name = name  # the metrics label and the `source` of the experts it brings: from the config only
        self.patterns = tuple(patterns)

    def matches(self, adapter: str) -> bool:
        return any(fnmatch.fnmatchcase(adapter, pattern) for pattern in self.patterns)

    def fetch(self, adapter: str, staging: Path, limits: FetchLimits) -> int:
        """Copy the adapter's files into `staging`; the bytes copied. SourceError says why not."""
        total = 0
        for file in (CONFIG_FILE, WEIGHTS_FILE, METADATA_FILE):
            limit = MAX_METADATA_BYTES if file == METADATA_FILE else limits.max_file_bytes
            limits.check_time(f"'{adapter}'")
            try:
                total += self._copy(adapter, file, staging / file, limit, limits)
            except _Missing:
                if file == CONFIG_FILE:
                    raise SourceError(NOT_FOUND, f"source '{self.name}' has no adapter '{adapter}'") from None
                if file == WEIGHTS_FILE:
                    if self._exists(adapter, PICKLED_WEIGHTS_FILE, limits):
                        raise SourceError(INVALID, f"{PICKLED_WEIGHTS_FILE} (pickle) is refused; save the adapter "
                                                   "as safetensors") from None
                    raise SourceError(INVALID, f"the adapter has {CONFIG_FILE} but no {WEIGHTS_FILE}") from None
        return total

    @abstractmethod
    def _copy(self, adapter: str, file: str, target: Path, limit: int, limits: FetchLimits) -> int:
        """Stream one file of the adapter to `target` (stream_to); _Missing if the source has no such file."""

    @abstractmethod
    def _exists(self, adapter: str, file: str, limits: FetchLimits) -> bool: ...

    @abstractmethod
    def origin(self, adapter: str) -> str:
        """Where the adapter's files came from, for the admin's listing (no credentials)."""


# ---- a folder tree --------------------------------------------------------------------------------

class FolderSource(AdapterSource):
    """`<path>/<name>/`: a local or mounted folder tree. Files must be regular files with one name inside
    the root (after symlinks), as for registration by path."""

    kind = "folder"

    def __init__(self, name: str, patterns: list[str], path: str):
        super().__init__(name, patterns)
        self.root = os.path.realpath(path)

    def _inside(self, path: str) -> bool:
        return path == self.root or path.startswith(self.root.rstrip(os.sep) + os.sep)

    def _copy(self, adapter: str, file: str, target: Path, limit: int, limits: FetchLimits) -> int:
        source = os.path.join(self.root, adapter, file)
        if not os.path.lexists(source):
            raise _Missing()
        real = os.path.realpath(source)
        what = f"{file} of '{adapter}'"
        if not self._inside(real):
            raise SourceError(INVALID, f"{what} links outside the source's folder")
        try:
            fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
        except FileNotFoundError:
            raise _Missing() from None
        except OSError as exc:
            raise SourceError(UNREACHABLE, f"{what} cannot be read: {exc.strerror}") from None
        with os.fdopen(fd, "rb") as handle:
            info = os.fstat(handle.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise SourceError(INVALID, f"{what} is not a regular file")
            if info.st_nlink > 1:
                raise SourceError(INVALID, f"{what} is a hard link (it may be a file from outside the source's "
                                           "folder)")
            if info.st_size > limit:
                raise SourceError(TOO_LARGE, f"{what} is {info.st_size} bytes, over the limit of {limit} bytes")
            return stream_to(_read_chunks(handle), target, limit, limits, what)

    def _exists(self, adapter: str, file: str, limits: FetchLimits) -> bool:
        return os.path.lexists(os.path.join(self.root, adapter, file))

    def origin(self, adapter: str) -> str:
        return f"file://{os.path.join(self.root, adapter)}/"


# ---- an S3-compatible bucket ----------------------------------------------------------------------

@dataclass(frozen=True)
class S3Access:
    """Where the bucket's server is and who we are there: read from the environment variables the config
    names, never written to a log or a message."""

    endpoint: str | None = None  # None: AWS's own endpoint for the region
    region: str | None = None
    access_key: str | None = None  # None: boto3's credential chain (AWS_* variables, ~/.aws, instance role)
    secret_key: str | None = None
    session_token: str | None = None

    def __repr__(self) -> str:  # never print the credentials
        return f"S3Access(endpoint={self.endpoint!r}, region={self.region!r})"


class S3Source(AdapterSource):
    """`s3://<bucket>/<prefix><name>/`, read with boto3 (AWS's maintained client; any S3-compatible server:
    MinIO, Ceph, R2, GCS's interoperability API). One GET per file, streamed; no retries (a failure is
    remembered briefly by the caller, and the next request after that tries again)."""

    kind = "s3"

    def __init__(self, name: str, patterns: list[str], bucket: str, prefix: str, access: S3Access,
                 addressing_style: str, timeout_s: float):
        super().__init__(name, patterns)
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self._access = access
        self._addressing_style = addressing_style
        self._timeout_s = timeout_s
        self._client = None
        self._client_lock = threading.Lock()  # boto3 clients are thread-safe once made; making one is not

    def client(self):
        with self._client_lock:
            if self._client is None:
                import boto3
                from botocore.config import Config

                a = self._access
                self._client = boto3.session.Session().client(
                    "s3", endpoint_url=a.endpoint, region_name=a.region, aws_access_key_id=a.access_key,
                    aws_secret_access_key=a.secret_key, aws_session_token=a.session_token,
                    config=Config(connect_timeout=min(5.0, self._timeout_s), read_timeout=self._timeout_s,
                                  retries={"total_max_attempts": 1},
                                  s3={"addressing_style": self._addressing_style}))
            return self._client

    def _key(self, adapter: str, file: str) -> str:
        return f"{self.prefix}{adapter}/{file}"

    def _copy(self, adapter: str, file: str, target: Path, limit: int, limits: FetchLimits) -> int:
        what = f"{file} of '{adapter}'"
        with self._errors(what):
            response = self.client().get_object(Bucket=self.bucket, Key=self._key(adapter, file))
            body = response["Body"]
            try:
                size = response.get("ContentLength")
                if size is not None and size > limit:
                    raise SourceError(TOO_LARGE, f"{what} is {size} bytes, over the limit of {limit} bytes")
                return stream_to(body.iter_chunks(CHUNK), target, limit, limits, what)
            finally:
                body.close()

    def _exists(self, adapter: str, file: str, limits: FetchLimits) -> bool:
        try:
            with self._errors(f"{file} of '{adapter}'"):
                self.client().head_object(Bucket=self.bucket, Key=self._key(adapter, file))
            return True
        except _Missing:
            return False

    def _errors(self, what: str):
        return _S3Errors(self, what)

    def origin(self, adapter: str) -> str:
        return f"s3://{self.bucket}/{self.prefix}{adapter}/"


class _S3Errors:
    """botocore's exceptions as SourceError (or _Missing for a key the bucket does not hold)."""

    def __init__(self, source: S3Source, what: str):
        self.source, self.what = source, what

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if exc is None or isinstance(exc, (SourceError, _Missing)):
            return False
        from botocore.exceptions import (BotoCoreError, ClientError, ConnectionError as BotoConnectionError,
                                         ConnectTimeoutError, NoCredentialsError, ReadTimeoutError)

        where = f"source '{self.source.name}'"
        if isinstance(exc, ClientError):
            error = exc.response.get("Error", {})
            code = str(error.get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("NoSuchKey", "NotFound", "404") or status == 404 and code != "NoSuchBucket":
                raise _Missing() from None
            if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch") or status == 403:
                raise SourceError(UNREACHABLE, f"{where} refused access to {self.what} ({code or status})") from None
            raise SourceError(UNREACHABLE, f"{where} answered {code or status} for {self.what}") from None
        if isinstance(exc, ReadTimeoutError):
            raise SourceError(TIMEOUT, f"{where} sent nothing for {self.source._timeout_s:g} s while "
                                       f"fetching {self.what} (adapter_fetch_timeout_s)") from None
        if isinstance(exc, (ConnectTimeoutError, BotoConnectionError)):
            raise SourceError(UNREACHABLE, f"{where} cannot be reached ({type(exc).__name__})") from None
        if isinstance(exc, NoCredentialsError):
            raise SourceError(UNREACHABLE, f"{where} has no credentials configured") from None
        if isinstance(exc, BotoCoreError):
            raise SourceError(UNREACHABLE, f"{where} failed: {type(exc).__name__}") from None
        return False


# ---- a Hugging Face Hub namespace -----------------------------------------------------------------

def _within(limits: FetchLimits, what: str, call):
    """call() in a thread of its own, waited for until the deadline. huggingface_hub retries a Hub it cannot
    reach with backoff (tens of seconds) and has no overall deadline: past ours the fetch fails with TIMEOUT,
    and the call, left to finish in the background, can only write into huggingface_hub's own cache."""
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["value"] = call()
        except BaseException as exc:  # handed to the waiting thread
            outcome["error"] = exc

    worker = threading.Thread(target=run, name="loraplex-hub-fetch", daemon=True)
    worker.start()
    worker.join(max(0.0, limits.remaining()))
    if worker.is_alive():
        raise SourceError(TIMEOUT, f"fetching {what} took longer than the limit of {limits.timeout_s:g} s "
                                   "(adapter_fetch_timeout_s)")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


class HubSource(AdapterSource):
    """`<namespace>/<repo>[/<subfolder>]` on the Hugging Face Hub, read with huggingface_hub into its own
    cache (HF_HUB_CACHE, or `cache_dir`) and copied from there. With HF_HUB_OFFLINE=1 nothing is
    downloaded: the cache's files are served and a name it does not hold is not found."""

    kind = "huggingface"

    def __init__(self, name: str, patterns: list[str], namespace: str, revision: str, cache_dir: str | None,
                 token: str | None, timeout_s: float, endpoint: str | None = None):
        super().__init__(name, patterns)
        self.namespace = namespace
        self.revision = revision
        self.cache_dir = cache_dir
        self._token = token
        self._timeout_s = timeout_s
        self._endpoint = endpoint  # None: the Hub (HF_ENDPOINT); a mirror otherwise

    def _where(self, adapter: str) -> tuple[str, str | None]:
        parts = adapter.split("/")
        if len(parts) < 2 or parts[0] != self.namespace:
            raise _Missing()
        return "/".join(parts[:2]), "/".join(parts[2:]) or None

    def _download(self, adapter: str, file: str, limits: FetchLimits, dry_run: bool):
        from huggingface_hub import constants, hf_hub_download
        from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, HfHubHTTPError,
                                            LocalEntryNotFoundError, OfflineModeIsEnabled, RepositoryNotFoundError,
                                            RevisionNotFoundError)

        repo, subfolder = self._where(adapter)
        where = f"source '{self.name}'"
        try:
            return _within(limits, f"{file} of '{adapter}'", lambda: hf_hub_download(
                repo, file, subfolder=subfolder, revision=self.revision, cache_dir=self.cache_dir, token=self._token,
                etag_timeout=max(0.1, limits.remaining()), endpoint=self._endpoint, dry_run=dry_run))
        except SourceError:
            raise
        except (LocalEntryNotFoundError, OfflineModeIsEnabled):
            if constants.HF_HUB_OFFLINE:  # the cache is all there is
                raise _Missing() from None
            raise SourceError(UNREACHABLE, f"{where}: the Hub cannot be reached and the cache does not hold "
                                           f"{file} of '{adapter}'") from None
        except GatedRepoError:
            raise SourceError(UNREACHABLE, f"{where} refused access to '{repo}' (a gated repository)") from None
        except (RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError):
            raise _Missing() from None
        except HfHubHTTPError as exc:
            status = exc.response.status_code if exc.response is not None else "an error"
            raise SourceError(UNREACHABLE, f"{where} answered {status} for {file} of '{adapter}'") from None
        except (TimeoutError,) as exc:
            raise SourceError(TIMEOUT, f"{where} timed out fetching {file} of '{adapter}'") from exc
        except OSError as exc:
            raise SourceError(UNREACHABLE, f"{where} failed fetching {file} of '{adapter}': "
                                           f"{type(exc).__name__}") from None
        except Exception as exc:  # httpx's transport errors
            kind = TIMEOUT if "Timeout" in type(exc).__name__ else UNREACHABLE
            raise SourceError(kind, f"{where} failed fetching {file} of '{adapter}': {type(exc).__name__}") from None

    def _copy(self, adapter: str, file: str, target: Path, limit: int, limits: FetchLimits) -> int:
        what = f"{file} of '{adapter}'"
        info = self._download(adapter, file, limits, dry_run=True)  # its size, before anything is downloaded
        if info.file_size is not None and info.file_size > limit:
            raise SourceError(TOO_LARGE, f"{what} is {info.file_size} bytes, over the limit of {limit} bytes")
        limits.check_time(what)
        path = info.local_path if info.is_cached else self._download(adapter, file, limits, dry_run=False)
        try:
            with open(path, "rb") as handle:
                return stream_to(_read_chunks(handle), target, limit, limits, what)
        except FileNotFoundError:  # removed from the cache meanwhile
            raise _Missing() from None

    def _exists(self, adapter: str, file: str, limits: FetchLimits) -> bool:
        try:
            self._download(adapter, file, limits, dry_run=True)
            return True
        except (_Missing, SourceError):
            return False

    def origin(self, adapter: str) -> str:
        repo, subfolder = self._where(adapter)
        return f"hf://{repo}{'/' + subfolder if subfolder else ''}@{self.revision}"
