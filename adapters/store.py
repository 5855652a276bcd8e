"""The managed adapter store: adapter files plus a manifest, under the data dir.

Layout: `<data_dir>/manifest.json` and `<data_dir>/store/<key>/` (adapter_config.json +
adapter_model.safetensors). Every change is staged and then renamed into place, files
first and manifest last: a crash in between leaves a folder no manifest entry names, which
the next start deletes. The manifest is the truth.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
from pathlib import Path

from adapters.lora import CONFIG_FILE, WEIGHTS_FILE

MANIFEST = "manifest.json"
STAGING_PREFIX = ".staging-"
MANIFEST_TMP_PREFIX = ".manifest-"  # a manifest being written; one left by a crash is deleted at start


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class AdapterStore:
    def __init__(self, data_dir: str | Path):
        self.root = Path(data_dir)
        self.files = self.root / "store"
        self.files.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    # ---- manifest -----------------------------------------------------------------------

    def read_manifest(self) -> dict[str, dict]:
        path = self.root / MANIFEST
        if not path.exists():
            return {}
        return json.loads(path.read_text())["adapters"]

    def _write_manifest(self, entries: dict[str, dict]) -> None:
        """Write a new manifest beside the old one, then swap it in: a reader (or a crash) sees the old
        manifest or the new one, never half of one. A failed write leaves the old one and no temp file."""
        fd, tmp = tempfile.mkstemp(prefix=MANIFEST_TMP_PREFIX, dir=self.root)
        try:
            with os.fdopen(fd, "w") as handle:
                json.dump({"version": 1, "adapters": entries}, handle, indent=2, sort_keys=True)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self.root / MANIFEST)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        _fsync_dir(self.root)

    def add_entry(self, name: str, entry: dict) -> None:
        with self._lock:
            entries = self.read_manifest()
            entries[name] = entry
            self._write_manifest(entries)

    def update_entry(self, name: str, entry: dict) -> bool:
        """Rewrite `name`'s entry if it is still registration entry["key"]; False (nothing written) if not."""
        with self._lock:
            entries = self.read_manifest()
            if entries.get(name, {}).get("key") != entry["key"]:
                return False
            entries[name] = entry
            self._write_manifest(entries)
            return True

    def rename_entry(self, old: str, new: str) -> None:
        """Key `old`'s entry as `new` (unless `new` is taken)."""
        with self._lock:
            entries = self.read_manifest()
            if old in entries and new not in entries:
                entries[new] = entries.pop(old)
                self._write_manifest(entries)

    def remove_entry(self, name: str, key: str) -> dict | None:
        """Drop `name` if it is still registration `key` (a newer one of that name stays)."""
        with self._lock:
            entries = self.read_manifest()
            if entries.get(name, {}).get("key") != key:
                return None
            entry = entries.pop(name)
            self._write_manifest(entries)
            return entry

    # ---- files --------------------------------------------------------------------------

    def staging_dir(self) -> Path:
        return Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=self.files))

    def commit_files(self, staging: Path, key: str) -> Path:
        """Move a validated staging folder to its final place (before the manifest names it)."""
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            with open(staging / name, "rb") as handle:
                os.fsync(handle.fileno())
        final = self.files / key
        os.replace(staging, final)
        _fsync_dir(self.files)
        return final

    def delete_files(self, folder: str | Path) -> None:
        folder = Path(folder)
        if folder.parent == self.files:  # never delete outside the managed store
            shutil.rmtree(folder, ignore_errors=True)

    def collect_garbage(self) -> list[str]:
        """Delete store folders the manifest does not name (left by a crash). Returns their names."""
        with self._lock:
            named = {Path(entry["folder"]).name for entry in self.read_manifest().values()}
            orphans = [p for p in self.files.iterdir() if p.is_dir() and p.name not in named]
            for orphan in orphans:
                shutil.rmtree(orphan, ignore_errors=True)
            for half_written in self.root.glob(MANIFEST_TMP_PREFIX + "*"):
                half_written.unlink(missing_ok=True)
            return [orphan.name for orphan in orphans]
