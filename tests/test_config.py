"""config: the settings table, environment and flags, every parser's error
path, and the real command line (`python comfymgr.py ...`) as a subprocess."""

from __future__ import annotations

import ipaddress
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import comfymgr
from comfymgr import BackendSpec, ConfigError, load_config

ROOT = Path(comfymgr.__file__).resolve().parent
SETTINGS = {st.name: st for st in comfymgr._SETTINGS}

# The documented defaults, parsed. A setting added later is covered by the
# generic tests below; one listed here must keep its default.
DEFAULTS = {
    "host": "0.0.0.0",
    "port": 9090,
    "api_keys": (),
    "state_dir": Path("comfymgr-state"),
    "rate_limit": 100,
    "trusted_proxies": (),
    "cors_origins": (),
    "max_body_bytes": 10 * 1024 * 1024,
    "log_format": "text",
    "log_level": "info",
    "db_synchronous": "full",
    "shutdown_timeout": 10.0,
    "comfyui_url": "http://127.0.0.1:8188",
    "backends": (),
    "job_timeout": 3600.0,
    "backend_timeout": 10.0,
    "backend_retries": 0,
    "reconcile_interval": 5.0,
    "cancel_grace": 30.0,
}

# A valid, non-default raw value per setting and what it parses to.
VALID = {
    "host": (" 127.0.0.1 ", "127.0.0.1"),
    "port": ("8080", 8080),
    "api_keys": (" key-a , key-b ,, ", ("key-a", "key-b")),
    "state_dir": ("/srv/comfymgr", Path("/srv/comfymgr")),
    "rate_limit": ("0", 0),
    "trusted_proxies": ("127.0.0.1, 10.1.2.3/8, ::1", (
        ipaddress.ip_network("127.0.0.1/32"), ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("::1/128"))),
    "cors_origins": ("https://app.example.com/, http://localhost:3000",
                     ("https://app.example.com", "http://localhost:3000")),
    "max_body_bytes": ("1", 1),
    "log_format": ("JSON", "json"),
    "log_level": ("Debug", "debug"),
    "db_synchronous": ("normal", "normal"),
    "shutdown_timeout": ("250ms", 0.25),
    "comfyui_url": ("https://comfy.example:8443/", "https://comfy.example:8443"),
    "backends": ("gpu0=http://127.0.0.1:8188@0, gpu1=http://127.0.0.1:8189/@1, cpu=http://h:1", (
        BackendSpec("gpu0", "http://127.0.0.1:8188", 0), BackendSpec("gpu1", "http://127.0.0.1:8189", 1),
        BackendSpec("cpu", "http://h:1", None))),
    "job_timeout": ("0", 0.0),
    "backend_timeout": ("2m", 120.0),
    "backend_retries": ("3", 3),
    "reconcile_interval": ("1.5s", 1.5),
    "cancel_grace": ("1h", 3600.0),
}
# A second valid value, to show that a flag wins over the environment.
OTHER = {name: raw for name, (raw, _) in VALID.items()}
OTHER.update({"host": "::1", "port": "9999", "api_keys": "other", "state_dir": "/tmp/other",
              "rate_limit": "7", "trusted_proxies": "192.168.0.0/16", "max_body_bytes": "2",
              "cors_origins": "*", "log_format": "text", "log_level": "error",
              "db_synchronous": "full", "shutdown_timeout": "3", "comfyui_url": "http://x:1",
              "backends": "a=http://a:1", "job_timeout": "7d", "backend_timeout": "1",
              "backend_retries": "9", "reconcile_interval": "9s", "cancel_grace": "2s"})

# One bad value per kind of parser, with the sentence after "NAME='value': ".
BAD_BY_PARSER = {
    comfymgr._parse_port: ("70000", "expected a port number 0-65535"),
    comfymgr._parse_count: ("-1", "expected a whole number >= 0"),
    comfymgr._parse_positive: ("0", "expected a whole number >= 1"),
    comfymgr._parse_duration: ("soon", "expected a duration such as 30, 30s, 5m, 24h or 7d"),
    comfymgr._parse_networks: ("10.0.0.0/8, proxy.local", "'proxy.local' is not an IP address or network"),
    comfymgr._parse_origins: ("app.example.com", ("'app.example.com' is not an origin like "
                                                  "https://app.example.com or *")),
    comfymgr._parse_url: ("localhost:8188", "expected an http:// or https:// URL"),
    comfymgr._parse_backends: ("gpu0", "'gpu0' is not NAME=URL[@GPU]"),
}
# A setting whose parser accepts anything, yet which cannot be empty.
BAD_BY_NAME = {"state_dir": ("", "expected a directory path")}
CHOICES = {"log_format": "text, json", "log_level": "debug, info, warning, error",
           "db_synchronous": "full, normal"}
BACKEND_NAME_RULE = "must use letters, digits, '-', '_', '.' and not be 'any' or 'local'"


def bad_value(st):
    if st.name in BAD_BY_NAME:
        return BAD_BY_NAME[st.name]
    if st.parse in BAD_BY_PARSER:
        return BAD_BY_PARSER[st.parse]
    if st.parse.__qualname__.startswith("_choice."):
        return "bogus", "expected one of " + CHOICES.get(st.name, "")
    return None


def cli(*args, env=None, cwd=None, timeout=30):
    """The real command line, with a clean environment."""
    environ = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONDONTWRITEBYTECODE": "1"}
    environ.update(env or {})
    return subprocess.run([sys.executable, str(ROOT / "comfymgr.py"), *args], env=environ,
                          cwd=cwd or ROOT, capture_output=True, text=True, timeout=timeout,
                          check=False)


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def compact(text):
    return "".join(text.split())


###############################################################################
# the table and the Config object
###############################################################################


def test_settings_table_and_config_fields_agree():
    fields = [f.name for f in comfymgr.dataclasses.fields(comfymgr.Config)]
    assert sorted(SETTINGS) == sorted(fields)
    assert len(comfymgr._SETTINGS) == len(SETTINGS)  # no name twice
    envs = [st.env for st in comfymgr._SETTINGS]
    assert len(set(envs)) == len(envs)
    for st in comfymgr._SETTINGS:
        assert st.flag == "--" + st.name.replace("_", "-")
        assert st.help and st.group


def test_defaults():
    config = comfymgr.Config.defaults()
    for name, value in DEFAULTS.items():
        assert getattr(config, name) == value, name
    # Every default in the table parses, and is what Config.defaults() holds.
    for st in comfymgr._SETTINGS:
        assert getattr(config, st.name) == st.parse(st.default), st.name
    assert load_config([], environ={}) == config
    assert config.backend_specs == (BackendSpec("local", "http://127.0.0.1:8188"),)


def test_defaults_accepts_overrides_and_refuses_unknown_names(tmp_path):
    config = comfymgr.Config.defaults(port=1, state_dir=tmp_path)
    assert (config.port, config.state_dir) == (1, tmp_path)
    with pytest.raises(TypeError, match="unknown settings: \\['prot'\\]"):
        comfymgr.Config.defaults(prot=1)
    with pytest.raises(comfymgr.dataclasses.FrozenInstanceError):
        config.port = 2


def test_every_known_setting_has_a_valid_example():
    assert set(VALID) == set(DEFAULTS)


def test_values_are_read_from_the_environment():
    environ = {SETTINGS[name].env: raw for name, (raw, _) in VALID.items()}
    config = load_config([], environ=environ)
    for name, (_, parsed) in VALID.items():
        assert getattr(config, name) == parsed, name
    assert config.backend_specs == VALID["backends"][1]


def test_flags_win_over_the_environment():
    environ = {SETTINGS[name].env: raw for name, raw in OTHER.items()}
    argv = [arg for name, (raw, _) in VALID.items() for arg in (SETTINGS[name].flag, raw)]
    config = load_config(argv, environ=environ)
    for name, (_, parsed) in VALID.items():
        assert getattr(config, name) == parsed, name
    # ...and the environment still fills what no flag gives.
    config = load_config(["--port", "1234"], environ={"MANAGEMENT_API_PORT": "4321",
                                                       "COMFYMGR_RATE_LIMIT": "5"})
    assert (config.port, config.rate_limit) == (1234, 5)


def test_an_unknown_flag_is_an_argparse_error():
    with pytest.raises(SystemExit) as exited:
        load_config(["--no-such-setting", "1"], environ={})
    assert exited.value.code == 2


###############################################################################
# every parser's error path
###############################################################################


def test_every_core_setting_but_free_text_has_a_bad_value_here():
    """The settings of the core (DEFAULTS) each get an exact error-path test;
    settings added later get at least the junk test below."""
    assert {name for name in DEFAULTS if bad_value(SETTINGS[name]) is None} == {"host", "api_keys"}


JUNK = ["", " ", "x", "-1", "0", "1.5", "1e400", "nan", "http://", "a=b", "=", ",", "~", "*",
        "é", "9" * 400]


@pytest.mark.parametrize("name", [st.name for st in comfymgr._SETTINGS])
def test_junk_is_parsed_or_refused_with_a_config_error_naming_the_setting(name):
    """Never any other exception: main() turns only ConfigError into exit 2."""
    st = SETTINGS[name]
    for junk in JUNK:
        try:
            load_config([], environ={st.env: junk})
        except ConfigError as exc:
            assert str(exc).startswith(f"{st.env}={junk!r}: "), str(exc)


def _params():
    for st in comfymgr._SETTINGS:
        if bad_value(st) is None:
            continue
        yield pytest.param(st.name, id=st.name)


@pytest.mark.parametrize("name", list(_params()))
def test_every_setting_refuses_a_bad_value_naming_the_env_var_or_flag(name):
    st = SETTINGS[name]
    raw, sentence = bad_value(st)
    with pytest.raises(ConfigError) as raised:
        load_config([], environ={st.env: raw})
    assert str(raised.value).startswith(f"{st.env}={raw!r}: {sentence}")
    with pytest.raises(ConfigError) as raised:
        load_config([f"{st.flag}={raw}"], environ={})
    assert str(raised.value).startswith(f"{st.flag}={raw!r}: {sentence}")


@pytest.mark.parametrize("name, raw, sentence", [
    ("port", "abc", "expected a whole number"),
    ("port", "", "expected a whole number"),
    ("port", "-1", "expected a port number 0-65535"),
    ("port", "65536", "expected a port number 0-65535"),
    ("rate_limit", "1.5", "expected a whole number"),
    ("max_body_bytes", "-3", "expected a whole number >= 1"),
    ("backend_retries", "many", "expected a whole number"),
    ("shutdown_timeout", "", "expected a duration such as 30, 30s, 5m, 24h or 7d"),
    ("shutdown_timeout", "5x", "expected a duration such as 30, 30s, 5m, 24h or 7d"),
    ("job_timeout", "-1s", "expected a duration >= 0"),
    ("backend_timeout", "nan", "expected a duration >= 0"),
    ("reconcile_interval", "inf", "expected a duration >= 0"),
    ("cancel_grace", "1e400s", "expected a duration >= 0"),
    ("trusted_proxies", "300.1.1.1", "'300.1.1.1' is not an IP address or network"),
    ("cors_origins", "https://ok.example, ftp://x",
     "'ftp://x' is not an origin like https://app.example.com or *"),
    ("comfyui_url", "http://", "expected an http:// or https:// URL"),
    ("comfyui_url", "ftp://h:1", "expected an http:// or https:// URL"),
    ("backends", "=http://h:1", "'=http://h:1' is not NAME=URL[@GPU]"),
    ("backends", "any=http://h:1", f"backend name 'any' {BACKEND_NAME_RULE}"),
    ("backends", "local=http://h:1", f"backend name 'local' {BACKEND_NAME_RULE}"),
    ("backends", "gpu 0=http://h:1", f"backend name 'gpu 0' {BACKEND_NAME_RULE}"),
    ("backends", "gpu0=ftp://h:1@0", "backend 'gpu0': 'ftp://h:1': expected an http:// or https:// URL"),
    # The GPU index typed inside the URL: read as user info, host x, until this check.
    ("backends", "gpu0=http://127.0.0.1:9@x", "backend 'gpu0': 'http://127.0.0.1:9@x': expected an "
     "http:// or https:// URL without user info (a GPU index goes after the whole URL, "
     "NAME=URL@GPU: gpu0=http://127.0.0.1:8188@0; credentials go in COMFYMGR_BACKEND_HEADERS_FILE)"),
    ("backends", "gpu0=http://127.0.0.1:99999@0", "backend 'gpu0': 'http://127.0.0.1:99999': "
     "expected an http:// or https:// URL with a valid port"),
    ("comfyui_url", "http://h:8188/?x=1", "expected an http:// or https:// URL without query, "
     "fragment or port 0"),
    ("comfyui_url", "http://user:9@h:8188", "expected an http:// or https:// URL without user "
     "info (a GPU index goes after the whole URL, NAME=URL@GPU: gpu0=http://127.0.0.1:8188@0; credentials go in "
     "COMFYMGR_BACKEND_HEADERS_FILE)"),
    ("backends", "gpu0=http://a:1,gpu0=http://b:2", "backend name 'gpu0' appears twice"),
    ("log_level", "trace", "expected one of debug, info, warning, error"),
])
def test_more_bad_values(name, raw, sentence):
    st = SETTINGS[name]
    with pytest.raises(ConfigError) as raised:
        load_config([], environ={st.env: raw})
    assert str(raised.value) == f"{st.env}={raw!r}: {sentence}"


@pytest.mark.parametrize("raw, seconds", [
    ("30", 30.0), ("30s", 30.0), ("250ms", 0.25), ("5m", 300.0), ("24h", 86400.0),
    ("7d", 604800.0), (" 2M ", 120.0), ("0", 0.0), ("1.5h", 5400.0)])
def test_durations(raw, seconds):
    assert comfymgr._parse_duration(raw) == seconds


def test_paths_expand_the_home_directory():
    assert comfymgr._parse_path("~/state") == Path.home() / "state"
    assert comfymgr._parse_path(" /srv/x ") == Path("/srv/x")


###############################################################################
# the real command line
###############################################################################


def test_serve_help_lists_every_setting_with_its_env_var_and_default():
    result = cli("serve", "--help")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    text = compact(result.stdout)
    for st in comfymgr._SETTINGS:
        entry = f"{st.flag} VALUE {st.help} [env {st.env}, default {st.default or '(empty)'}]"
        assert compact(entry) in text, st.name
    for group in {st.group for st in comfymgr._SETTINGS}:
        assert f"{group} settings:" in result.stdout


def test_a_bad_environment_value_exits_2_with_one_line_naming_it(tmp_path):
    result = cli(env={"MANAGEMENT_API_PORT": "abc"}, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr == "comfymgr: error: MANAGEMENT_API_PORT='abc': expected a whole number\n"
    assert list(tmp_path.iterdir()) == []  # stopped before creating anything


def test_a_bad_flag_value_exits_2_with_one_line_naming_it(tmp_path):
    result = cli("--backends", "gpu0=http://h:1,gpu0=http://h:2",
                 env={"COMFYMGR_RATE_LIMIT": "10"}, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr == ("comfymgr: error: --backends='gpu0=http://h:1,gpu0=http://h:2': "
                             "backend name 'gpu0' appears twice\n")


def test_an_empty_state_dir_exits_2_with_one_line(tmp_path):
    # Once parsed to None: create_app died with a TypeError traceback, exit 1.
    result = cli(env={"COMFYMGR_STATE_DIR": "", "MANAGEMENT_API_PORT": str(free_port()),
                      "MANAGEMENT_API_HOST": "127.0.0.1", "MANAGEMENT_API_KEY": "k",
                      "COMFYUI_URL": f"http://127.0.0.1:{free_port()}"}, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr == "comfymgr: error: COMFYMGR_STATE_DIR='': expected a directory path\n"


def test_config_table_prints_the_generated_table():
    result = cli("--config-table")
    assert result.returncode == 0, result.stderr
    assert result.stdout == comfymgr._config_table() + "\n"
    lines = comfymgr._config_table().splitlines()
    assert lines[:2] == ["| Variable | Flag | Default | Meaning |", "|---|---|---|---|"]
    assert len(lines) == 2 + len(comfymgr._SETTINGS)
    for st, line in zip(comfymgr._SETTINGS, lines[2:]):
        default = f"`{st.default}`" if st.default else "(empty)"
        assert line == f"| `{st.env}` | `{st.flag}` | {default} | {st.help} |"


def test_version():
    result = cli("--version")
    assert result.returncode == 0
    assert result.stdout == f"comfymgr {comfymgr.__version__}\n"
