"""The managed adapter store's crash safety: the manifest is replaced whole or not at all."""
import json
import os

import pytest

from adapters.store import AdapterStore


def test_a_failed_manifest_write_keeps_the_old_manifest_and_no_temp_file(tmp_path, monkeypatch):
    store = AdapterStore(tmp_path)
    store.add_entry("kept", {"key": "kept-1", "folder": str(tmp_path / "store" / "kept-1")})
    before = (tmp_path / "manifest.json").read_text()

    def full_disk(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(OSError):
        store.add_entry("lost", {"key": "lost-1", "folder": str(tmp_path / "store" / "lost-1")})
    monkeypatch.undo()
    assert (tmp_path / "manifest.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json", "store"]
    assert set(store.read_manifest()) == {"kept"}


def test_a_manifest_half_written_by_a_crash_is_ignored_and_cleaned_at_start(tmp_path):
    store = AdapterStore(tmp_path)
    store.add_entry("kept", {"key": "kept-1", "folder": str(tmp_path / "store" / "kept-1")})
    (tmp_path / "store" / "kept-1").mkdir()
    # the process died while writing the next manifest: a truncated temp file beside the real one
    (tmp_path / ".manifest-abc123").write_text('{"version": 1, "adapters": {"kept": {"key": "ke')
    restarted = AdapterStore(tmp_path)
    assert json.loads((tmp_path / "manifest.json").read_text())["adapters"].keys() == {"kept"}
    assert restarted.collect_garbage() == []  # no store folder is an orphan...
    assert not (tmp_path / ".manifest-abc123").exists()  # ...and the half-written manifest is gone
    assert set(restarted.read_manifest()) == {"kept"}
