"""Settings precedence and validation."""
from pathlib import Path

import pytest

from server.settings import ConfigError, load_settings


def test_defaults_serve_the_embedded_model():
    settings = load_settings(environ={})
    assert settings.base_model == "embedded:smollm2"
    assert settings.quantization == "auto" and settings.device == "auto"


def test_yaml_then_env_then_cli(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("max_batch_size: 4\nport: 9000\nhost: 0.0.0.0\n")
    env = {"LORAPLEX_MAX_BATCH_SIZE": "6", "LORAPLEX_PORT": "9100"}
    settings = load_settings(str(config), {"port": 9200, "host": None}, environ=env)
    assert settings.max_batch_size == 6  # env beats yaml
    assert settings.port == 9200  # cli beats env
    assert settings.host == "0.0.0.0"  # an unset cli flag changes nothing


def test_adapter_paths_are_relative_to_the_config_file(tmp_path):
    config = tmp_path / "sub" / "c.yaml"
    config.parent.mkdir()
    config.write_text("adapters:\n  pirate:\n    path: ../experts/pirate\n    stop: ['</r>']\n")
    settings = load_settings(str(config), environ={})
    assert settings.adapters["pirate"].path == str(tmp_path / "sub" / ".." / "experts" / "pirate")
    assert settings.adapters["pirate"].stop == ["</r>"]


def test_env_json_for_structured_keys():
    env = {"LORAPLEX_ADAPTERS": '{"a": {"path": "/x"}}'}
    assert load_settings(environ=env).adapters["a"].path == "/x"


@pytest.mark.parametrize(
    "yaml_text, fragment",
    [
        ("max_batch_size: 0", "max_batch_size"),
        ("quantization: fp3", "quantization"),
        ("bogus_key: 1", "bogus_key"),
        ("default_max_tokens: 5000\nmax_tokens_limit: 100", "default_max_tokens"),
        ("adapters:\n  'bad name!':\n    path: /x", "bad name!"),
        ("- just\n- a list", "mapping"),
        ("key: [unclosed", "not valid YAML"),
        ("kv_cache_memory: lots", "not an amount of memory"),
        ("kv_cache_memory: 0", "above 0"),
        ("kv_cache_memory: 2 XB", "kv_cache_memory"),
        ("kv_block_size: 12", "kv_block_size"),
        ("max_step_tokens: 4", "max_step_tokens"),
    ],
)
def test_bad_config_is_a_config_error(tmp_path, yaml_text, fragment):
    config = tmp_path / "c.yaml"
    config.write_text(yaml_text)
    with pytest.raises(ConfigError) as err:
        load_settings(str(config), environ={})
    assert fragment in str(err.value)


def test_bad_env_value_is_a_config_error():
    with pytest.raises(ConfigError) as err:
        load_settings(environ={"LORAPLEX_MAX_BATCH_SIZE": "many"})
    assert "max_batch_size" in str(err.value)


def test_plain_serve_uses_the_default_config_with_the_demo_experts():
    from server.startup.cli import DEFAULT_CONFIG

    settings = load_settings(str(DEFAULT_CONFIG), environ={})
    assert settings.base_model == "embedded:smollm2"
    assert set(settings.adapters) == {"json-answer", "pirate", "terse", "arithmetic", "units", "weekday", "extract", "sql"}
    for spec in settings.adapters.values():
        assert (Path(spec.path) / "adapter_model.safetensors").is_file()


def test_config_text_that_is_not_valid_unicode_is_a_clear_error(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text('adapters:\n  x:\n    path: /a\n    description: "ok \\ud800"\n')  # YAML escape: a lone surrogate
    with pytest.raises(ConfigError, match="adapters.x.description .*not valid Unicode"):
        load_settings(str(config), environ={})


def test_environment_bytes_that_are_not_utf8_are_a_clear_error():
    # os.environ turns undecodable bytes into lone surrogates (surrogateescape)
    with pytest.raises(ConfigError, match="not valid Unicode"):
        load_settings(environ={"LORAPLEX_API_KEY": "key\udcff"})


@pytest.mark.parametrize("name", ["ok\n", "a/b", "", "x" * 129])
def test_config_expert_names_must_match_as_a_whole(tmp_path, name):
    with pytest.raises(ConfigError, match="adapter name"):
        load_settings(cli_overrides={"adapters": {name: {"path": "/a"}}}, environ={})


@pytest.mark.parametrize("given", ["auto", "0.5", "2GiB", "512 MiB", "1073741824"])
def test_kv_cache_memory_takes_bytes_fractions_or_auto(given):
    assert load_settings(environ={"LORAPLEX_KV_CACHE_MEMORY": given}).kv_cache_memory == given
