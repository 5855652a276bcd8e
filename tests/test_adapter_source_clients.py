"""The adapter sources' clients on their own (adapters/sources.py) and their settings, without a model: what
the server-level tests (test_adapter_sources.py) cannot reach cheaply. Real parts only: a folder tree, a Hub
cache written by huggingface_hub, a server that never answers."""
from __future__ import annotations

import os
import shutil
import time

import pytest

from adapters.names import check_source_name
from adapters.sources import INVALID, NOT_FOUND, TIMEOUT, FetchLimits, FolderSource, HubSource, SourceError
from server.experts.sources import build_sources
from server.settings import ConfigError, load_settings
from tests.support.sources import DEMO, SilentServer, lay_out_hub_cache

PIRATE = DEMO / "pirate" / "adapter"


def limits(seconds: float = 5.0) -> FetchLimits:
    return FetchLimits.starting_now(10_000_000, seconds)


@pytest.mark.parametrize("name", ["pirate", "acme/pirate", "hubteam/repo/sub-folder", "ft:base:x:1/v2"])
def test_names_a_source_may_resolve(name):
    assert check_source_name(name) == name


@pytest.mark.parametrize("name", ["", "/etc/passwd", "acme/../x", "..", "acme/./x", "acme//x", "acme/x/",
                                  "s3://bucket/x", "http://host/x", "acme\\..\\x", "a b", "x" * 129, "ok\n"])
def test_names_that_could_leave_the_root_or_carry_a_location_are_refused(name):
    with pytest.raises(ValueError, match="adapter name"):
        check_source_name(name)


def test_a_folder_source_stays_inside_its_root(tmp_path):
    root = tmp_path / "root"
    shutil.copytree(PIRATE, root / "team" / "ok")
    (root / "team" / "escape").mkdir(parents=True)
    os.symlink(PIRATE / "adapter_config.json", root / "team" / "escape" / "adapter_config.json")
    shutil.copytree(PIRATE, root / "team" / "linked")
    os.unlink(root / "team" / "linked" / "adapter_model.safetensors")
    shutil.copy(PIRATE / "adapter_model.safetensors", tmp_path / "outside.safetensors")
    os.link(tmp_path / "outside.safetensors", root / "team" / "linked" / "adapter_model.safetensors")
    source = FolderSource("shelf", ["team/*"], str(root))
    staging = tmp_path / "staging"
    staging.mkdir()
    with pytest.raises(SourceError) as refused:
        source.fetch("team/escape", staging, limits())
    assert refused.value.kind == INVALID and "outside" in refused.value.message
    with pytest.raises(SourceError) as refused:
        source.fetch("team/linked", staging, limits())
    assert refused.value.kind == INVALID and "hard link" in refused.value.message
    with pytest.raises(SourceError) as refused:
        source.fetch("team/none", staging, limits())
    assert refused.value.kind == NOT_FOUND
    assert source.fetch("team/ok", staging, limits()) > 4_000_000
    assert str(tmp_path) not in refused.value.message  # no server path in what a client reads


def test_an_online_hub_that_never_answers_times_out_within_the_limit(tmp_path):
    """huggingface_hub retries with backoff for tens of seconds; the fetch ends at its own deadline."""
    silent = SilentServer()
    try:
        source = HubSource("hub", ["org/*"], "org", "main", str(tmp_path / "cache"), None, 1.5,
                           endpoint=silent.endpoint)
        started = time.monotonic()
        with pytest.raises(SourceError) as refused:
            source.fetch("org/adapter", tmp_path, FetchLimits.starting_now(10_000_000, 1.5))
        assert refused.value.kind == TIMEOUT
        assert time.monotonic() - started < 4
    finally:
        silent.close()


def test_a_hub_cache_serves_the_revision_it_holds(tmp_path):
    lay_out_hub_cache(tmp_path / "cache", {"org/pirate": PIRATE})
    source = HubSource("hub", ["org/*"], "org", "main", str(tmp_path / "cache"), None, 5)
    staging = tmp_path / "staging"
    staging.mkdir()
    assert source.fetch("org/pirate", staging, limits()) == sum(
        (PIRATE / f).stat().st_size for f in ("adapter_config.json", "adapter_model.safetensors", "expert.json"))
    assert (staging / "adapter_model.safetensors").read_bytes() == (PIRATE / "adapter_model.safetensors").read_bytes()
    assert source.origin("org/pirate") == "hf://org/pirate@main"


def test_sources_in_the_config(tmp_path):
    (tmp_path / "shelf").mkdir()
    config = tmp_path / "server.yaml"
    config.write_text("adapter_sources:\n"
                      "  - {name: shelf, kind: folder, path: shelf, patterns: ['team/*']}\n"
                      "  - {name: bucket, kind: s3, bucket: b, patterns: ['acme/*'], endpoint_env: MY_ENDPOINT}\n")
    settings = load_settings(str(config), environ={})
    assert settings.adapter_sources[0].path == str(tmp_path / "shelf")  # relative to the config file
    with pytest.raises(ConfigError, match="MY_ENDPOINT") as missing:
        build_sources(settings.adapter_sources, 5, environ={})
    assert "not set" in str(missing.value)
    sources = build_sources(settings.adapter_sources, 5, environ={"MY_ENDPOINT": "http://127.0.0.1:9"})
    assert [s.kind for s in sources] == ["folder", "s3"]


@pytest.mark.parametrize("sources, fragment", [
    ([{"name": "upload", "kind": "folder", "path": "/x", "patterns": ["*"]}], "registered another way"),
    ([{"name": "a", "kind": "folder", "path": "/x", "patterns": ["*"]}] * 2, "unique"),
    ([{"name": "a", "kind": "folder", "path": "/x", "patterns": []}], "patterns"),
    ([{"name": "a", "kind": "ftp", "path": "/x", "patterns": ["*"]}], "kind"),
    ([{"name": "a", "kind": "s3", "bucket": "b", "patterns": ["*"], "access_key_env": "K"}], "together"),
])
def test_bad_sources_are_config_errors(sources, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_settings(cli_overrides={"adapter_sources": sources}, environ={})
