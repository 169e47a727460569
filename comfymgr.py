"""comfymgr: the management API in front of ComfyUI servers.

comfymgr is the one door to the ComfyUI servers on a GPU box. It keeps a
priority queue of jobs in SQLite that survives restarts and crashes, feeds
each ComfyUI server (a "backend", usually one per GPU) one job at a time
through ComfyUI's own HTTP API and WebSocket, streams job events to
WebSocket clients, exports Prometheus metrics with real GPU figures from
NVML, and guards all of it with API keys, rate limits and input validation.

Run it:

    python3 comfymgr.pyz                # the packaged service
    python3 comfymgr.py --help          # every setting, its env var, default

The public surface is the HTTP API (see /docs), the command line (`main`) and
`create_app(config)`; everything else in this module is private.
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["Config", "ConfigError", "create_app", "load_config", "main"]

import argparse
import asyncio
import base64
import bisect
import collections
import concurrent.futures
import contextlib
import dataclasses
import email.utils
import enum
import errno
import faulthandler
import fcntl
import functools
import hashlib
import hmac
import ipaddress
import json
import logging
import math
import mimetypes
import os
import queue
import random
import re
import secrets
import shutil
import signal
import socket
import sqlite3
import ssl
import stat
import sys
import textwrap
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import aiohttp.abc
import yarl
from aiohttp import web
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# Optional accelerators: comfymgr behaves the same without them, only slower
# (figures in docs/PERFORMANCE.md).
try:
    import orjson
except ImportError:
    orjson = None

###############################################################################
# config
###############################################################################
# What a setting's value may be: the parsers that turn text from a flag or
# the environment into a value, or refuse it with a sentence naming why (the
# settings section below puts the setting's name in front).


class ConfigError(Exception):
    """A setting has a value comfymgr cannot run with; the message names it."""


def _parse_str(value: str) -> str:
    return value.strip()


def _parse_port(value: str) -> int:
    port = _parse_int(value)
    if not 0 <= port <= 65535:
        raise ValueError("expected a port number 0-65535")
    return port


def _parse_int(value: str) -> int:
    try:
        return int(value.strip())
    except ValueError:
        raise ValueError("expected a whole number") from None


def _parse_count(value: str) -> int:
    number = _parse_int(value)
    if number < 0:
        raise ValueError("expected a whole number >= 0")
    return number


def _parse_positive(value: str) -> int:
    number = _parse_int(value)
    if number < 1:
        raise ValueError("expected a whole number >= 1")
    return number


_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


def _parse_duration(value: str) -> float:
    """Seconds, or a number with a unit: 250ms, 30s, 5m, 24h, 7d."""
    text = value.strip().lower()
    for unit in sorted(_DURATION_UNITS, key=len, reverse=True):
        if text.endswith(unit):
            number, scale = text[: -len(unit)], _DURATION_UNITS[unit]
            break
    else:
        number, scale = text, 1
    try:
        seconds = float(number) * scale
    except ValueError:
        raise ValueError("expected a duration such as 30, 30s, 5m, 24h or 7d") from None
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError("expected a duration >= 0")
    return seconds


def _parse_list(value: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in value.split(",") if item.strip())


def _parse_networks(value: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    networks = []
    for item in _parse_list(value):
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ValueError(f"{item!r} is not an IP address or network") from None
    return tuple(networks)


def _parse_origins(value: str) -> tuple[str, ...]:
    origins = _parse_list(value)
    for origin in origins:
        if origin != "*" and not origin.startswith(("http://", "https://")):
            raise ValueError(f"{origin!r} is not an origin like https://app.example.com or *")
    return tuple(origin.rstrip("/") for origin in origins)


def _parse_path(value: str) -> Path | None:
    value = value.strip()
    return Path(value).expanduser() if value else None


def _parse_required_path(value: str) -> Path:
    path = _parse_path(value)
    if path is None:
        raise ValueError("expected a directory path")
    return path


def _parse_bool(value: str) -> bool:
    text = value.strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("expected true or false")


def _choice(*choices: str) -> Callable[[str], str]:
    def parse(value: str) -> str:
        value = value.strip().lower()
        if value not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}")
        return value

    return parse


def _parse_url(value: str) -> str:
    """An http(s) base URL: scheme, host, an optional port and path; no user
    info, query or fragment (an '@' there is most often a misplaced GPU index)."""
    value = value.strip().rstrip("/")
    try:
        parts = urllib.parse.urlsplit(value)
        port = parts.port
    except ValueError:
        raise ValueError("expected an http:// or https:// URL with a valid port") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("expected an http:// or https:// URL")
    if "@" in parts.netloc:
        raise ValueError("expected an http:// or https:// URL without user info (a GPU index "
                         "goes after the whole URL, NAME=URL@GPU: gpu0=http://127.0.0.1:8188@0; "
                         "credentials go in COMFYMGR_BACKEND_HEADERS_FILE)")
    if parts.query or parts.fragment or (port is not None and port == 0):
        raise ValueError("expected an http:// or https:// URL without query, fragment or port 0")
    return value


def _parse_webhook_secrets(value: str) -> tuple[bytes, ...]:
    secrets_: list[bytes] = []
    for item in _parse_list(value):
        if not item.startswith("whsec_"):
            raise ValueError("expected whsec_<base64> (Standard Webhooks secret form)")
        try:
            raw = base64.b64decode(item[len("whsec_"):], validate=True)
        except ValueError:
            raise ValueError("the part after whsec_ is not base64") from None
        if len(raw) < 16:
            raise ValueError("a secret must be at least 16 bytes (24 base64 characters)")
        secrets_.append(raw)
    return tuple(secrets_)


def _parse_hosts_and_networks(value: str) -> tuple[Any, ...]:
    """Host names (lower-cased strings) and IP networks, mixed."""
    entries: list[Any] = []
    for item in _parse_list(value):
        try:
            entries.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            if not item or set(item.lower()) - set("abcdefghijklmnopqrstuvwxyz0123456789-."):
                raise ValueError(f"{item!r} is neither a host name nor an IP network") from None
            entries.append(item.lower().rstrip("."))
    return tuple(entries)


_KEY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def _parse_client_keys(value: str) -> tuple[tuple[str, str], ...]:
    """`NAME:KEY,...`: keys of applications that see only their own jobs."""
    keys: list[tuple[str, str]] = []
    for item in _parse_list(value):
        name, sep, key = item.partition(":")
        if not sep or not key.strip():
            raise ValueError("expected NAME:KEY[,NAME:KEY...]")
        name = name.strip()
        if not _KEY_NAME.match(name) or name == ADMIN:
            raise ValueError(f"client key name {name!r} must be 1-64 letters, digits, '_', '.', "
                             f"'-' and not {ADMIN!r}")
        if any(n == name for n, _ in keys):
            raise ValueError(f"client key name {name!r} appears twice")
        if any(k == key.strip() for _, k in keys):
            raise ValueError(f"client keys {name!r} and another share one key")
        keys.append((name, key.strip()))
    return tuple(keys)


ADMIN = "admin"  # the name jobs submitted with a MANAGEMENT_API_KEY key record


@dataclasses.dataclass(frozen=True)
class BackendSpec:
    """One ComfyUI server: its name (the submit field `gpu` selects it), base
    URL, and the physical GPU index it runs on when configured."""

    name: str
    url: str
    gpu_index: int | None = None


def _parse_backends(value: str) -> tuple[BackendSpec, ...]:
    """`NAME=URL[@GPU], ...`, e.g. `gpu0=http://127.0.0.1:8188@0,gpu1=http://127.0.0.1:8189@1`."""
    backends: list[BackendSpec] = []
    for item in _parse_list(value):
        name, sep, rest = item.partition("=")
        name = name.strip()
        if not sep or not name:
            raise ValueError(f"{item!r} is not NAME=URL[@GPU]")
        if not all(c.isalnum() or c in "-_." for c in name) or name in ("any", "local"):
            raise ValueError(f"backend name {name!r} must use letters, digits, '-', '_', '.' and not be 'any' or 'local'")
        url, gpu_index = rest.strip(), None
        head, at, tail = url.rpartition("@")
        if at and tail.isdigit():
            url, gpu_index = head, int(tail)
        try:
            url = _parse_url(url)
        except ValueError as exc:
            raise ValueError(f"backend {name!r}: {url!r}: {exc}") from None
        if any(b.name == name for b in backends):
            raise ValueError(f"backend name {name!r} appears twice")
        backends.append(BackendSpec(name, url, gpu_index))
    return tuple(backends)


# Headers comfymgr sets itself, or that frame the request: a file that set
# them would break every call, not authenticate it.
_RESERVED_HEADERS = frozenset({
    "host", "content-length", "content-type", "transfer-encoding", "connection", "upgrade",
    "keep-alive", "te", "trailer", "proxy-connection", "sec-websocket-key",
    "sec-websocket-version", "sec-websocket-extensions", "sec-websocket-protocol"})
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


@dataclasses.dataclass(frozen=True, repr=False)
class _BackendHeaders:
    """COMFYMGR_BACKEND_HEADERS_FILE, read: extra request headers per backend
    name (for the reverse proxy that guards a remote ComfyUI). The values are
    secrets: repr shows the file and the backend names, never a value."""

    path: Path | None = None
    by_backend: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = ()
    mode: int = 0o600  # the file's permission bits when it was read

    def names(self) -> set[str]:
        return {name for name, _ in self.by_backend}

    def for_backend(self, name: str) -> dict[str, str]:
        return next((dict(headers) for n, headers in self.by_backend if n == name), {})

    def __repr__(self) -> str:
        return f"_BackendHeaders(path={self.path!r}, backends={sorted(self.names())!r})"


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"{key!r} appears twice")
        seen[key] = value
    return seen


def _parse_headers_file(value: str) -> _BackendHeaders:
    """Read and check the headers file. Every message names the backend and
    the header, never a value."""
    path = _parse_path(value)
    if path is None:
        return _BackendHeaders()
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"cannot read it: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ValueError("it is not UTF-8 text") from None
    try:
        data = json.loads(text, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    except ValueError as exc:  # a key twice
        raise ValueError(f"not valid: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError('expected a JSON object {"<backend name>": {"<header>": "<value>", ...}}')
    by_backend = []
    for name, headers in data.items():
        if not isinstance(headers, dict):
            raise ValueError(f"backend {name!r}: expected an object of header names to values")
        seen: set[str] = set()
        for header, header_value in headers.items():
            if not _HEADER_NAME.fullmatch(header):
                raise ValueError(f"backend {name!r}: {header!r} is not a valid header name")
            if header.lower() in _RESERVED_HEADERS:
                raise ValueError(f"backend {name!r}: header {header!r} is set by comfymgr itself")
            if header.lower() in seen:
                raise ValueError(f"backend {name!r}: header {header!r} appears twice")
            seen.add(header.lower())
            if not isinstance(header_value, str) or any(
                    ord(c) < 32 and c != "\t" or ord(c) == 127 for c in header_value):
                raise ValueError(f"backend {name!r}, header {header!r}: the value must be a string "
                                 "without line breaks or control characters")
        by_backend.append((name, tuple(headers.items())))
    return _BackendHeaders(path, tuple(by_backend), mode)


def _load_ca_bundle(path: Path) -> ssl.SSLContext:
    """A client TLS context that trusts exactly the CAs in `path` (PEM), and
    verifies certificates and host names as the default context does."""
    return ssl.create_default_context(cafile=str(path))


def _parse_ca_file(value: str) -> Path | None:
    path = _parse_path(value)
    if path is None:
        return None
    try:
        _load_ca_bundle(path)
    except ssl.SSLError:  # an OSError too: first
        raise ValueError("no PEM certificate in it") from None
    except OSError as exc:
        raise ValueError(f"cannot read it: {exc.strerror}") from None
    return path


###############################################################################
# settings
###############################################################################
# Every setting is declared once, in _SETTINGS. The CLI flags, `--help`, the
# table of docs/CONFIGURATION.md (`make readme`) and validation are all built
# from it; the result is one frozen Config that is passed around. Nothing
# below this section reads os.environ.


@dataclasses.dataclass(frozen=True)
class _Setting:
    name: str  # the Config attribute; the flag is --name-with-dashes
    env: str
    default: str
    parse: Callable[[str], Any]
    help: str
    group: str

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


def _settings() -> tuple[_Setting, ...]:
    s = _Setting
    return (
        # -- service --------------------------------------------------------
        s("host", "MANAGEMENT_API_HOST", "0.0.0.0", _parse_str,
          "Address to listen on.", "service"),
        s("port", "MANAGEMENT_API_PORT", "9090", _parse_port,
          "Port to listen on.", "service"),
        s("api_keys", "MANAGEMENT_API_KEY", "", _parse_list,
          "API key(s) clients send as X-API-Key; comma-separated to rotate. "
          "Empty: one is generated and stored in the state directory.", "service"),
        s("client_keys", "COMFYMGR_CLIENT_KEYS", "", _parse_client_keys,
          "Client keys, NAME:KEY,...: each sees, cancels, streams and downloads only the jobs "
          "submitted with a key of its name (MANAGEMENT_API_KEY keys see everything).",
          "service"),
        s("state_dir", "COMFYMGR_STATE_DIR", "./comfymgr-state", _parse_required_path,
          "Directory for the database and the generated API key.", "service"),
        s("rate_limit", "COMFYMGR_RATE_LIMIT", "100", _parse_count,
          "Requests per minute per client address; 0 turns rate limiting off.", "service"),
        s("trusted_proxies", "COMFYMGR_TRUSTED_PROXIES", "", _parse_networks,
          "Proxy addresses/networks whose X-Forwarded-For is believed (e.g. 127.0.0.1).", "service"),
        s("cors_origins", "COMFYMGR_CORS_ORIGINS", "", _parse_origins,
          "Origins allowed to call the API from a browser (comma-separated, or *). "
          "Empty: same-origin only.", "service"),
        s("max_body_bytes", "COMFYMGR_MAX_BODY_BYTES", "10485760", _parse_positive,
          "Largest request body accepted, in bytes.", "service"),
        s("log_format", "COMFYMGR_LOG_FORMAT", "text", _choice("text", "json"),
          "Log line format: text or json.", "service"),
        s("log_level", "COMFYMGR_LOG_LEVEL", "info", _choice("debug", "info", "warning", "error"),
          "Lowest level logged.", "service"),
        s("db_synchronous", "COMFYMGR_DB_SYNCHRONOUS", "full", _choice("full", "normal"),
          "SQLite synchronous mode: full survives power loss; normal survives process crashes only.",
          "service"),
        s("shutdown_timeout", "COMFYMGR_SHUTDOWN_TIMEOUT", "10s", _parse_duration,
          "How long a graceful stop waits for in-flight requests.", "service"),
        s("max_wait", "COMFYMGR_MAX_WAIT", "300s", _parse_duration,
          "Longest ?wait= a submit or a job GET may hold its answer for the job's end.",
          "service"),
        # -- comfyui --------------------------------------------------------
        s("comfyui_url", "COMFYUI_URL", "http://127.0.0.1:8188", _parse_url,
          "The ComfyUI server, when COMFYUI_BACKENDS is empty (backend name: local).", "comfyui"),
        s("backends", "COMFYUI_BACKENDS", "", _parse_backends,
          "Several ComfyUI servers: NAME=URL[@GPU],... where GPU is the physical GPU index "
          "(e.g. gpu0=http://127.0.0.1:8188@0,gpu1=http://127.0.0.1:8189@1).", "comfyui"),
        s("backend_headers_file", "COMFYMGR_BACKEND_HEADERS_FILE", "", _parse_headers_file,
          "JSON file of request headers per backend, for the proxy in front of a remote ComfyUI: "
          '{"gpu0": {"Authorization": "Bearer ..."}}. Read once at start; keep it mode 0600 '
          "(docs/SCALING.md).", "comfyui"),
        s("backend_ca_file", "COMFYMGR_BACKEND_CA_FILE", "", _parse_ca_file,
          "PEM bundle of the CAs that https:// backends' certificates must chain to, instead of "
          "the system's (a private CA). TLS is always verified.", "comfyui"),
        s("job_timeout", "COMFYMGR_JOB_TIMEOUT", "1h", _parse_duration,
          "Default run-time limit per job (submit field `timeout` overrides); 0 = none.",
          "comfyui"),
        s("backend_timeout", "COMFYMGR_BACKEND_TIMEOUT", "10s", _parse_duration,
          "Timeout of every HTTP call to a ComfyUI server.", "comfyui"),
        s("backend_retries", "COMFYMGR_BACKEND_RETRIES", "0", _parse_count,
          "How often a job whose ComfyUI restarted under it is queued again before it fails "
          "with backend_lost.", "comfyui"),
        s("reconcile_interval", "COMFYMGR_RECONCILE_INTERVAL", "5s", _parse_duration,
          "How often in-flight jobs are checked against ComfyUI's /queue and /history.",
          "comfyui"),
        s("cancel_grace", "COMFYMGR_CANCEL_GRACE", "30s", _parse_duration,
          "How long a cancel waits for ComfyUI to confirm the interrupt before the job is "
          "recorded cancelled anyway.", "comfyui"),
        s("prefetch", "COMFYMGR_PREFETCH", "true", _parse_bool,
          "While a job runs, hand the next one to ComfyUI's own queue, so the GPU does not "
          "idle between jobs; a more urgent job arriving later takes its place back.",
          "comfyui"),
        s("dispatch_attempts", "COMFYMGR_DISPATCH_ATTEMPTS", "3", _parse_positive,
          "POST /prompt attempts per job that ComfyUI refuses (an answer other than 200 or "
          "400) or never answers, before the job fails with dispatch_failed.", "comfyui"),
        s("backend_lost_after", "COMFYMGR_BACKEND_LOST_AFTER", "120s", _parse_duration,
          "How long the job running on a backend that went down waits for it to come back "
          "before it fails with backend_lost (or is queued again, see "
          "COMFYMGR_BACKEND_RETRIES).", "comfyui"),
        s("progress_interval", "COMFYMGR_PROGRESS_INTERVAL", "500ms", _parse_duration,
          "Least time between two progress events of one job (the latest value is kept).",
          "comfyui"),
        # -- stream ---------------------------------------------------------
        s("heartbeat", "COMFYMGR_HEARTBEAT", "30s", _parse_duration,
          "Interval of the stream's heartbeat message and WebSocket ping; a client that "
          "does not answer a ping within half of it is closed. 0 = off.", "stream"),
        s("event_retention", "COMFYMGR_EVENT_RETENTION", "7d", _parse_duration,
          "How long events are kept for clients that resume with `since`.", "stream"),
        s("ws_send_queue", "COMFYMGR_WS_SEND_QUEUE", "1000", _parse_positive,
          "Messages a stream client may fall behind by before it is closed with 1013.",
          "stream"),
        s("ws_max_clients", "COMFYMGR_WS_MAX_CLIENTS", "10000", _parse_positive,
          "Most stream clients connected at once; more are refused with 503.", "stream"),
        # -- files ----------------------------------------------------------
        s("outputs_dir", "COMFYUI_OUTPUTS", "", _parse_path,
          "ComfyUI's output folder (its --output-directory); served under /v1/comfyui/output/.",
          "files"),
        s("temp_dir", "COMFYUI_TEMP", "", _parse_path,
          "ComfyUI's temp folder (PreviewImage outputs, type temp).", "files"),
        s("inputs_dir", "COMFYUI_INPUTS", "", _parse_path,
          "ComfyUI's input folder; uploads go here when set, else through ComfyUI's "
          "/upload/image.", "files"),
        s("models_checkpoints", "COMFYUI_MODELS_CHECKPOINTS", "", _parse_path,
          "Checkpoint models folder; unset: ComfyUI's own list is shown.", "files"),
        s("models_loras", "COMFYUI_MODELS_LORAS", "", _parse_path, "LoRA models folder.", "files"),
        s("models_vae", "COMFYUI_MODELS_VAE", "", _parse_path, "VAE models folder.", "files"),
        s("models_controlnet", "COMFYUI_MODELS_CONTROLNET", "", _parse_path,
          "ControlNet models folder.", "files"),
        s("models_upscale", "COMFYUI_MODELS_UPSCALE", "", _parse_path,
          "Upscale models folder.", "files"),
        s("max_upload_bytes", "COMFYMGR_MAX_UPLOAD_BYTES", "52428800", _parse_positive,
          "Largest input image accepted by POST /v1/comfyui/inputs, in bytes.", "files"),
        s("max_input_bytes", "COMFYMGR_MAX_INPUT_BYTES", "52428800", _parse_positive,
          "Largest inline input of a submit (`inputs`: base64 or a URL), in bytes decoded. "
          "Base64 in the body also counts against COMFYMGR_MAX_BODY_BYTES.", "files"),
        s("keep_inputs", "COMFYMGR_KEEP_INPUTS", "false", _parse_bool,
          "Keep a job's inline inputs after it ended (else they are removed from the state "
          "directory and COMFYUI_INPUTS).", "files"),
        s("fetch_timeout", "COMFYMGR_FETCH_TIMEOUT", "30s", _parse_duration,
          "Connect-and-read timeout of fetching an inline input given as a URL.", "files"),
        s("inline_max_bytes", "COMFYMGR_INLINE_MAX_BYTES", "8388608", _parse_positive,
          "Largest output file put inline (base64) into an answer or a webhook with "
          "include=data; larger ones keep only their url.", "files"),
        s("retention_days", "COMFYMGR_RETENTION_DAYS", "30", _parse_count,
          "Delete finished jobs and their events after this many days (their output files "
          "too with COMFYMGR_RETENTION_DELETE_OUTPUTS); 0 keeps them forever.", "files"),
        s("retention_delete_outputs", "COMFYMGR_RETENTION_DELETE_OUTPUTS", "false", _parse_bool,
          "With COMFYMGR_RETENTION_DAYS, also delete the output files of the jobs removed.",
          "files"),
        # -- webhooks and idempotency ---------------------------------------
        s("public_url", "COMFYMGR_PUBLIC_URL", "", lambda v: _parse_url(v) if v.strip() else None,
          "The URL clients reach comfymgr at (e.g. https://gpu1.example.com); makes output URLs "
          "in webhooks absolute.", "webhooks"),
        s("webhook_secrets", "COMFYMGR_WEBHOOK_SECRET", "", _parse_webhook_secrets,
          "Standard Webhooks signing secret(s), whsec_<base64>, comma-separated to rotate (every "
          "one signs). Empty: one is generated and stored in the state directory.", "webhooks"),
        s("webhook_allow", "COMFYMGR_WEBHOOK_ALLOW", "", _parse_hosts_and_networks,
          "Hosts and networks that webhooks and input URLs may reach although they are not "
          "public (e.g. receiver.lan,10.1.2.0/24,127.0.0.1). Without them only public addresses "
          "are reached; a ComfyUI backend's own host and port never are.", "webhooks"),
        s("webhook_max_attempts", "COMFYMGR_WEBHOOK_MAX_ATTEMPTS", "8", _parse_positive,
          "Attempts per delivery before it is marked failed.", "webhooks"),
        s("webhook_max_age", "COMFYMGR_WEBHOOK_MAX_AGE", "24h", _parse_duration,
          "A delivery still failing this long after its event is marked failed.", "webhooks"),
        s("webhook_backoff", "COMFYMGR_WEBHOOK_BACKOFF", "5s", _parse_duration,
          "Delay before the first retry; it doubles with each attempt (with jitter), "
          "at most 1h.", "webhooks"),
        s("webhook_timeout", "COMFYMGR_WEBHOOK_TIMEOUT", "10s", _parse_duration,
          "Connect-and-answer timeout of one delivery attempt.", "webhooks"),
        s("idempotency_ttl", "COMFYMGR_IDEMPOTENCY_TTL", "24h", _parse_duration,
          "How long an Idempotency-Key of a submit is remembered.", "webhooks"),
        # -- gpu ------------------------------------------------------------
        s("gpu_poll_interval", "COMFYMGR_GPU_POLL_INTERVAL", "5s", _parse_duration,
          "How often GPU figures are read from NVML.", "gpu"),
    )


_SETTINGS = _settings()


@dataclasses.dataclass(frozen=True)
class Config:
    """Every setting, parsed. Build it with `load_config()`; tests use
    `Config.defaults(**overrides)`."""

    host: str
    port: int
    api_keys: tuple[str, ...]
    client_keys: tuple[tuple[str, str], ...]
    state_dir: Path
    rate_limit: int
    trusted_proxies: tuple[Any, ...]
    cors_origins: tuple[str, ...]
    max_body_bytes: int
    log_format: str
    log_level: str
    db_synchronous: str
    shutdown_timeout: float
    comfyui_url: str
    backends: tuple[BackendSpec, ...]
    backend_headers_file: _BackendHeaders
    backend_ca_file: Path | None
    job_timeout: float
    backend_timeout: float
    backend_retries: int
    reconcile_interval: float
    cancel_grace: float
    prefetch: bool
    dispatch_attempts: int
    backend_lost_after: float
    progress_interval: float
    heartbeat: float
    event_retention: float
    ws_send_queue: int
    ws_max_clients: int
    gpu_poll_interval: float
    outputs_dir: Path | None
    temp_dir: Path | None
    inputs_dir: Path | None
    models_checkpoints: Path | None
    models_loras: Path | None
    models_vae: Path | None
    models_controlnet: Path | None
    models_upscale: Path | None
    max_upload_bytes: int
    max_input_bytes: int
    keep_inputs: bool
    fetch_timeout: float
    inline_max_bytes: int
    max_wait: float
    retention_days: int
    retention_delete_outputs: bool
    public_url: str | None
    webhook_secrets: tuple[bytes, ...]
    webhook_allow: tuple[Any, ...]
    webhook_max_attempts: int
    webhook_max_age: float
    webhook_backoff: float
    webhook_timeout: float
    idempotency_ttl: float

    @classmethod
    def defaults(cls, **overrides: Any) -> Config:
        values = {st.name: st.parse(st.default) for st in _SETTINGS}
        unknown = set(overrides) - set(values)
        if unknown:
            raise TypeError(f"unknown settings: {sorted(unknown)}")
        values.update(overrides)
        return cls(**values)

    @property
    def backend_specs(self) -> tuple[BackendSpec, ...]:
        """The backends to drive: COMFYUI_BACKENDS, else COMFYUI_URL as `local`."""
        return self.backends or (BackendSpec("local", self.comfyui_url),)


def _argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="comfymgr",
        usage="comfymgr [--help] [--version] [--config-table] [--SETTING VALUE ...]",
        description="The management API in front of ComfyUI. Every setting can be given as a "
        "flag or as its environment variable; flags win. Prefer the environment for keys "
        "and secrets: flags show in the process list.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"comfymgr {__version__}")
    parser.add_argument("--config-table", action="store_true",
                        help="Print the settings as a Markdown table and exit.")
    groups: dict[str, argparse._ArgumentGroup] = {}
    for st in _SETTINGS:
        group = groups.get(st.group) or groups.setdefault(
            st.group, parser.add_argument_group(f"{st.group} settings"))
        group.add_argument(st.flag, dest=st.name, default=None, metavar="VALUE",
                           help=f"{st.help} [env {st.env}, default {st.default or '(empty)'}]")
    return parser


def load_config(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Build the Config from flags (first) and the environment. Raises
    ConfigError naming the setting when a value is bad."""
    args = _argument_parser().parse_args(argv)
    environ = os.environ if environ is None else environ
    values, sources = {}, {}
    for st in _SETTINGS:
        given = getattr(args, st.name)
        source = st.flag if given is not None else st.env
        raw = given if given is not None else environ.get(st.env, st.default)
        sources[st.name] = f"{source}={raw!r}"
        try:
            values[st.name] = st.parse(raw)
        except ValueError as exc:
            raise ConfigError(_redact_credentials(f"{source}={raw!r}: {exc}")) from None
    config = Config(**values)
    unknown = config.backend_headers_file.names() - {b.name for b in config.backend_specs}
    if unknown:
        raise ConfigError(f"{sources['backend_headers_file']}: no backend is named "
                          f"{', '.join(map(repr, sorted(unknown)))} (the backends are "
                          f"{', '.join(b.name for b in config.backend_specs)})")
    return config


def _redact_credentials(text: str) -> str:
    """user:password@ in URLs masked: a refused setting is printed back, and
    it must not put a secret into the journal (a port-like "host:9@" stays)."""
    return re.sub(r"//([^/@\s:]*):([^/@\s]*[^/@\s0-9][^/@\s]*)@", r"//\1:***@", text)


def _config_table() -> str:
    """The settings table of docs/CONFIGURATION.md, generated so that it never drifts."""
    lines = ["| Variable | Flag | Default | Meaning |", "|---|---|---|---|"]
    for st in _SETTINGS:
        default = f"`{st.default}`" if st.default else "(empty)"
        lines.append(f"| `{st.env}` | `{st.flag}` | {default} | {st.help} |")
    return "\n".join(lines)


###############################################################################
# errors
###############################################################################
# One base class. Every error a client can cause is an ApiError carrying its
# HTTP status and a stable machine-readable code; one middleware turns each
# into the same JSON envelope:
#   {"error": code, "message": sentence, "statusCode": status, "details": {...}}


class ComfymgrError(Exception):
    """Base of comfymgr's own errors."""


class ApiError(ComfymgrError):
    status = 500
    code = "internal_error"

    def __init__(self, message: str, *, details: Mapping[str, Any] | None = None,
                 code: str | None = None, headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.details = dict(details or {})
        self.headers = dict(headers or {})
        if code:
            self.code = code

    def with_status(self, status: int) -> ApiError:
        self.status = status
        return self

    def envelope(self) -> dict[str, Any]:
        return {"error": self.code, "message": self.message,
                "statusCode": self.status, "details": self.details}


class BadRequest(ApiError):
    status, code = 400, "invalid_request"


class Unauthorized(ApiError):
    status, code = 401, "unauthorized"


class Forbidden(ApiError):
    status, code = 403, "forbidden"


class NotFound(ApiError):
    status, code = 404, "not_found"


class MethodNotAllowed(ApiError):
    status, code = 405, "method_not_allowed"


class Conflict(ApiError):
    status, code = 409, "conflict"


class PayloadTooLarge(ApiError):
    status, code = 413, "payload_too_large"


class UnprocessableEntity(ApiError):
    status, code = 422, "unprocessable"


class RateLimited(ApiError):
    status, code = 429, "rate_limited"


class ServiceUnavailable(ApiError):
    status, code = 503, "unavailable"


class StorageUnavailable(ServiceUnavailable):
    code = "storage_unavailable"


###############################################################################
# utilities
###############################################################################

Clock = Callable[[], float]


def _ms(seconds: float) -> int:
    return int(round(seconds * 1000))


def _new_id() -> str:
    """Job ids and ComfyUI prompt ids: canonical lowercase UUID4 strings."""
    return str(uuid.uuid4())


def _dumps(value: Any) -> str:
    # orjson, when installed, encodes 10-15x faster (a 20 KB workflow: 5 us,
    # not 75; submits x1.15, docs/PERFORMANCE.md).
    if orjson is not None:
        try:
            return orjson.dumps(value).decode()
        except TypeError:  # what orjson refuses (ints past 64 bits, lone surrogates): the stdlib's way
            pass
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _sorted_json(value: Any) -> bytes:
    """Canonical JSON (keys sorted): the same value always gives the same bytes."""
    if orjson is not None:
        try:
            return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
        except TypeError:  # ints past 64 bits: the stdlib's way
            pass
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:40]} is too large")
    return value


def _loads(text: str | bytes) -> Any:
    """Strict JSON: no NaN/Infinity (not even 1e999), no lone UTF-16
    surrogates (they cannot be stored as UTF-8), bounded nesting."""
    try:
        value = json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
    raw = text if isinstance(text, str) else text.decode("utf-8", "replace")
    # Only a \uD800-\uDFFF escape can smuggle one in; escaped pairs (emoji
    # from an ASCII-only client) are common and fine: only a lone-looking
    # one costs the full check.
    if "\\u" in raw and _LONE_SURROGATE.search(raw):
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("a string holds an unpaired UTF-16 surrogate (\\uD800-\\uDFFF)") from None
    return value


# A high surrogate escape not followed by a low one, or a low one not after a
# high one (may match an escaped backslash too: then the full check decides).
_LONE_SURROGATE = re.compile(r"\\u[dD][89abAB][0-9a-fA-F]{2}(?!\\u[dD][c-fC-F][0-9a-fA-F]{2})"
                             r"|(?<!\\u[dD][89abAB][0-9a-fA-F]{2})\\u[dD][c-fC-F][0-9a-fA-F]{2}")


def _nesting_exceeds(value: Any, limit: int) -> bool:
    """True when objects and arrays nest deeper than `limit` (walked
    without recursion, so any depth json.loads returned can be measured).
    One level at a time: no tuple and no generator per container (every
    submit pays this walk: 36 us for a 20 KB workflow, not 60)."""
    level = [value] if isinstance(value, (dict, list)) else []
    depth = 0
    while level:
        depth += 1
        if depth > limit:
            return True
        below = []
        for item in level:
            for child in item.values() if isinstance(item, dict) else item:
                if isinstance(child, (dict, list)):
                    below.append(child)
        level = below
    return False


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class _JsonLogFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key in ("job", "backend", "prompt_id", "client"):
            if hasattr(record, key):
                entry[key] = getattr(record, key)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return _dumps(entry)


def _setup_logging(log_format: str, level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(_JsonLogFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("comfymgr")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
    # aiohttp's access log repeats what our metrics count; keep its errors only.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


class _Schema:
    """A small JSON Schema (draft 2020-12 subset) validator for request
    bodies and query strings. The same schema objects are published in
    /openapi.json, so what the docs promise is what the handlers enforce."""

    _TYPES: dict[str, Callable[[Any], bool]] = {
        "object": lambda v: isinstance(v, dict),
        "array": lambda v: isinstance(v, list),
        "string": lambda v: isinstance(v, str),
        "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        "boolean": lambda v: isinstance(v, bool),
        "null": lambda v: v is None,
    }
    _WORDS = {"object": "an object", "array": "an array", "string": "a string",
              "integer": "an integer", "number": "a number", "boolean": "true or false",
              "null": "null"}

    @classmethod
    def validate(cls, schema: Mapping[str, Any], value: Any, path: tuple[str, ...] = ()) -> None:
        """Raise BadRequest naming the first offending field."""
        problem = cls._check(schema, value, path)
        if problem:
            where, sentence = problem
            field = ".".join(where) or "body"
            details: dict[str, Any] = {"field": field}
            if len(where) >= 2 and where[0] == "workflow":
                details["nodeId"] = where[1]
            raise BadRequest(f"{field}: {sentence}", details=details)

    # Schemas (by identity) with a check of their own that gives the same
    # answers as the generic walk, faster: every submit walks every node.
    fast: dict[int, Callable[[Any, tuple[str, ...]], tuple[tuple[str, ...], str] | None]] = {}

    @classmethod
    def _check(cls, schema: Mapping[str, Any], value: Any,
               path: tuple[str, ...]) -> tuple[tuple[str, ...], str] | None:
        fast = cls.fast.get(id(schema))
        if fast is not None:
            return fast(value, path)
        kind = schema.get("type")
        if kind is not None:
            # One type is the common case: no generator for it (a submit checks every node).
            if isinstance(kind, str):
                if not cls._TYPES[kind](value):
                    return path, f"must be {cls._WORDS[kind]}"
            elif not any(cls._TYPES[k](value) for k in kind):
                return path, f"must be {' or '.join(cls._WORDS[k] for k in kind)}"
        if "enum" in schema and value not in schema["enum"]:
            return path, f"must be one of {', '.join(map(str, schema['enum']))}"
        if isinstance(value, str):
            if len(value) < schema.get("minLength", 0):
                return path, f"must be at least {schema['minLength']} characters"
            if "maxLength" in schema and len(value) > schema["maxLength"]:
                return path, f"must be at most {schema['maxLength']} characters"
            if "pattern" in schema and not re.search(schema["pattern"], value):
                return path, f"must match {schema['pattern']}"
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if "minimum" in schema and value < schema["minimum"]:
                return path, f"must be >= {schema['minimum']}"
            if "exclusiveMinimum" in schema and value <= schema["exclusiveMinimum"]:
                return path, f"must be > {schema['exclusiveMinimum']}"
            if "maximum" in schema and value > schema["maximum"]:
                return path, f"must be <= {schema['maximum']}"
        if isinstance(value, dict):
            if len(value) < schema.get("minProperties", 0):
                return path, "must not be empty" if schema["minProperties"] == 1 else \
                    f"must have at least {schema['minProperties']} entries"
            for name in schema.get("required", ()):
                if name not in value:
                    return path + (name,), "is required"
            properties = schema.get("properties", {})
            extra = schema.get("additionalProperties", True)
            # A schema that says nothing of the members (a node's inputs) has nothing to check.
            for name, item in value.items() if properties or extra is not True else ():
                if name in properties:
                    problem = cls._check(properties[name], item, path + (name,))
                elif extra is False:
                    return path + (name,), "is not a known field"
                elif isinstance(extra, dict):
                    problem = cls._check(extra, item, path + (name,))
                else:
                    problem = None
                if problem:
                    return problem
        if isinstance(value, list):
            if len(value) < schema.get("minItems", 0):
                return path, f"must have at least {schema['minItems']} items"
            if "maxItems" in schema and len(value) > schema["maxItems"]:
                return path, f"must have at most {schema['maxItems']} items"
            if "items" in schema:
                for index, item in enumerate(value):
                    problem = cls._check(schema["items"], item, path + (str(index),))
                    if problem:
                        return problem
        return None


###############################################################################
# metrics
###############################################################################
# comfymgr's own registry (never the global one), so tests and several apps
# in one process do not share counters. Labels are bounded sets: statuses,
# error codes, route templates, backend names, GPU indexes; never raw paths.

_DURATION_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600)
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


# The *_created series double every counter for no operational use.
disable_created_metrics()


class _Metrics:
    """The metric objects, and one collector that reads live state (backends,
    GPUs, stream clients) at scrape time, so a series exists only while its
    subject does: no NVML, no GPU series."""

    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry(auto_describe=True)
        # -- the seed's metrics, names and labels unchanged ------------------
        self.workflow_total = Counter(
            "comfyui_workflow", "Jobs that reached each status.", ["status"], registry=registry)
        self.workflow_duration = Histogram(
            "comfyui_workflow_duration_seconds", "Run time of jobs, start to end, by GPU model.",
            ["gpu_type"], buckets=_DURATION_BUCKETS, registry=registry)
        self.workflow_errors = Counter(
            "comfyui_workflow_errors", "Failed jobs by error code.", ["error_type"],
            registry=registry)
        self.queue_length = Gauge(
            "comfyui_queue_length", "Jobs waiting in comfymgr's queue now.", registry=registry)
        # -- the service itself ----------------------------------------------
        self.http_requests = Counter(
            "comfymgr_http_requests", "HTTP requests by route template, method and status.",
            ["route", "method", "status"], registry=registry)
        self.http_latency = Histogram(
            "comfymgr_http_request_duration_seconds", "HTTP request latency by route template.",
            ["route", "method"], buckets=_LATENCY_BUCKETS, registry=registry)
        self.queue_by_priority = Gauge(
            "comfymgr_queue_length", "Jobs waiting in comfymgr's queue by priority.",
            ["priority"], registry=registry)
        self.queue_oldest_age = Gauge(
            "comfymgr_queue_oldest_age_seconds", "Age of the oldest job waiting in the queue "
            "(0 when none waits).", registry=registry)
        self.database_size = Gauge(
            "comfymgr_database_size_bytes", "Size of the SQLite database with its WAL.",
            registry=registry)
        self.stream_publish_lag = Histogram(
            "comfymgr_stream_publish_lag_seconds", "Time from an event's commit to its fan-out "
            "to stream clients.", buckets=_LATENCY_BUCKETS, registry=registry)
        self.webhook_deliveries = Counter(
            "comfymgr_webhook_deliveries", "Webhook delivery attempts by outcome: sent, retried "
            "(will be tried again), failed (given up).", ["outcome"], registry=registry)
        self.task_failures = Counter(
            "comfymgr_task_failures", "Unexpected errors of comfymgr's background tasks; each "
            "task was restarted after a back-off (see /v1/status tasks).", ["task"],
            registry=registry)
        self.dispatch_failures = Counter(
            "comfymgr_dispatch_failures", "POST /prompt attempts that ComfyUI refused, did not "
            "answer, or answered unreadably.", ["backend"], registry=registry)
        self.messages_ignored = Counter(
            "comfymgr_backend_messages_ignored", "Messages from ComfyUI's WebSocket that "
            "comfymgr ignored: unknown_type (custom nodes), bad_shape (a known type with "
            "unexpected data), unreadable (not JSON, or a binary frame it cannot read).",
            ["backend", "reason"], registry=registry)
        for outcome in ("sent", "retried", "failed"):  # at 0 from the start, for increase()
            self.webhook_deliveries.labels(outcome)
        self.retention_removed = Counter(
            "comfymgr_retention_removed", "Jobs, events and files removed by retention.",
            ["kind"], registry=registry)
        self.build_info = Gauge(
            "comfymgr_build_info", "Always 1; the labels say which comfymgr runs.",
            ["version", "python"], registry=registry)
        self.build_info.labels(__version__, sys.version.split()[0]).set(1)
        self.live_state: Callable[[], Iterable[Any]] = lambda: ()
        registry.register(_LiveCollector(self))
        self._http_children: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    def count_request(self, route: str, method: str, status: int, seconds: float) -> None:
        # labels() checks and locks on every call: the children of each label
        # set (a bounded set) are looked up once (bench/ab.py: GET x1.07).
        children = self._http_children.get((route, method, status))
        if children is None:
            children = self._http_children[(route, method, status)] = (
                self.http_requests.labels(route, method, str(status)),
                self.http_latency.labels(route, method))
        children[0].inc()
        if status != 101:  # a WebSocket's whole life is not a request latency
            children[1].observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _LiveCollector:
    """Yields the families `_Metrics.live_state` builds from current state."""

    def __init__(self, metrics: _Metrics) -> None:
        self._metrics = metrics

    def describe(self) -> list[Any]:
        return []  # nothing to declare up front; families come and go with their subjects

    def collect(self) -> Iterable[Any]:
        yield from self._metrics.live_state()


def _gauge(name: str, documentation: str, labels: Sequence[str],
           samples: Iterable[tuple[Sequence[str], float]]) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, documentation, labels=list(labels))
    for values, value in samples:
        family.add_metric(list(values), value)
    return family


###############################################################################
# supervision
###############################################################################
# Every long-lived task runs under the supervisor: an unexpected exception is
# logged at ERROR with its traceback, counted in comfymgr_task_failures_total,
# shown in /v1/status (`tasks`, and the component's own lastError), and the
# task starts again after a back-off. Nothing dies silently. Background tasks
# are started and cancelled through it only.

_log_tasks = logging.getLogger("comfymgr.tasks")

_RESTART_BASE, _RESTART_MAX = 0.5, 30.0
_RESTART_RESET = 60.0  # a task that ran this long before failing starts from the base delay
# Failures reported by their owners, who recover themselves (see report()).
_REPORTED_TASKS = ("stream:sender", "webhooks:delivery", "background")


@dataclasses.dataclass(eq=False)
class _TaskState:
    name: str
    failures: int = 0
    last_error: str | None = None
    last_error_at: float | None = None
    task: asyncio.Task[None] | None = None
    restarted: bool = False  # started by the supervisor (else only reported: per-client tasks)

    def view(self) -> dict[str, Any]:
        running = (self.task is not None and not self.task.done()) if self.restarted else None
        return {"name": self.name, "running": running,
                "failures": self.failures, "lastError": self.last_error,
                "lastErrorAt": _ms(self.last_error_at) if self.last_error_at else None}


class _Supervisor:
    """Starts, restarts and stops the background tasks. Only the event loop
    touches it."""

    def __init__(self, metrics: _Metrics, clock: Clock) -> None:
        self.metrics = metrics
        self.clock = clock
        self.tasks: dict[str, _TaskState] = {}
        self.restart_base = _RESTART_BASE
        for name in _REPORTED_TASKS:
            metrics.task_failures.labels(name)

    def start(self, name: str, run: Callable[[], Any], *,
              on_error: Callable[[str], None] | None = None) -> None:
        """Run `run()` (a coroutine function that loops until cancelled) as
        task `name`; on_error hears the text of each failure."""
        state = self.tasks.setdefault(name, _TaskState(name))
        state.restarted = True
        self.metrics.task_failures.labels(name)  # the series exists at 0, for increase()
        state.task = asyncio.create_task(self._keep(state, run, on_error), name=name)

    def report(self, name: str, exc: BaseException) -> str:
        """Record a failure of `name` that its owner recovers from itself
        (e.g. a stream client's sender: the client is closed and resumes)."""
        state = self.tasks.setdefault(name, _TaskState(name))
        text = f"{type(exc).__name__}: {exc}".strip().rstrip(":")[:500]
        _log_tasks.error("task %s failed: %s", name, text, exc_info=exc)
        state.failures += 1
        state.last_error, state.last_error_at = text, self.clock()
        self.metrics.task_failures.labels(name).inc()
        return text

    async def _keep(self, state: _TaskState, run: Callable[[], Any],
                    on_error: Callable[[str], None] | None) -> None:
        loop = asyncio.get_running_loop()
        delay = self.restart_base
        while True:
            began = loop.time()
            try:
                await run()
                raise RuntimeError("the task returned; it must run until cancelled")
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the point of supervision
                text = self.report(state.name, exc)
                if on_error is not None:
                    with contextlib.suppress(Exception):
                        on_error(text)
            if loop.time() - began >= _RESTART_RESET:
                delay = self.restart_base
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(_RESTART_MAX, delay * 2)

    async def stop(self, prefix: str = "") -> None:
        """Cancel the tasks whose names start with `prefix` and wait for them."""
        states = [s for s in self.tasks.values() if s.name.startswith(prefix) and s.task is not None]
        for state in states:
            state.task.cancel()
        await asyncio.gather(*(s.task for s in states), return_exceptions=True)
        for state in states:
            state.task = None

    def view(self) -> list[dict[str, Any]]:
        return [state.view() for state in self.tasks.values()]


###############################################################################
# jobs
###############################################################################
# What a job is: its priorities, its states and the moves between them (one
# table, _ALLOWED, that Storage._transition() enforces), and the rows jobs and
# events are read into.


class Priority(enum.IntEnum):
    HIGH = 0
    NORMAL = 1
    LOW = 2

    @property
    def label(self) -> str:
        return self.name.lower()


PRIORITY_NAMES = tuple(p.label for p in Priority)
TARGET_ANY = "any"  # a job any backend may run; otherwise the backend's name


class JobState(str, enum.Enum):
    QUEUED = "queued"            # waiting in comfymgr's queue
    DISPATCHING = "dispatching"  # prompt id stored, POST /prompt not yet acknowledged
    SUBMITTED = "submitted"      # ComfyUI accepted the prompt; it has not started yet
    RUNNING = "running"          # ComfyUI said execution_start
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


S = JobState
# What the API shows: the seed's five statuses. The finer states exist so that
# a restart knows exactly what to ask ComfyUI about.
_PUBLIC_STATUS = {S.QUEUED: "queued", S.DISPATCHING: "queued", S.SUBMITTED: "queued",
                  S.RUNNING: "running", S.COMPLETED: "completed", S.FAILED: "failed",
                  S.CANCELLED: "cancelled"}
PUBLIC_STATUSES = ("queued", "running", "completed", "failed", "cancelled")
_TERMINAL = frozenset({S.COMPLETED, S.FAILED, S.CANCELLED})
_PUBLIC_QUEUED = (S.QUEUED, S.DISPATCHING, S.SUBMITTED)
_IN_FLIGHT = (S.DISPATCHING, S.SUBMITTED, S.RUNNING)
_ALLOWED: dict[JobState, frozenset[JobState]] = {
    S.QUEUED: frozenset({S.DISPATCHING, S.CANCELLED, S.FAILED}),
    # A fast prompt can start, or even finish, before POST /prompt's answer
    # reaches us, so dispatching may jump straight to running or an end.
    S.DISPATCHING: frozenset({S.SUBMITTED, S.RUNNING, S.QUEUED, S.COMPLETED, S.FAILED,
                              S.CANCELLED}),
    S.SUBMITTED: frozenset({S.RUNNING, S.QUEUED, S.COMPLETED, S.FAILED, S.CANCELLED}),
    S.RUNNING: frozenset({S.QUEUED, S.COMPLETED, S.FAILED, S.CANCELLED}),
    S.COMPLETED: frozenset(), S.FAILED: frozenset(), S.CANCELLED: frozenset(),
}
# The stream event each state change produces (the seed's event names).
# Dispatching and submitted are internal steps with no event of their own.
_EVENT_FOR_STATE = {S.QUEUED: "workflow:queued", S.RUNNING: "workflow:started",
                    S.COMPLETED: "workflow:completed", S.FAILED: "workflow:error",
                    S.CANCELLED: "workflow:cancelled"}
EVENT_PROGRESS = "workflow:progress"
EVENT_PREVIEW = "workflow:preview"  # ephemeral: not stored, no seq
EVENT_TYPES = ("workflow:queued", "workflow:started", EVENT_PROGRESS, "workflow:completed",
               "workflow:cancelled", "workflow:error")
del S


class SchemaTooNew(sqlite3.DatabaseError):
    """The database was migrated by a newer comfymgr: this one must not touch it."""


class StorageError(ComfymgrError):
    """What Storage refuses; the HTTP layer gives each its status and code."""

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message, self.details = message, details


class JobNotFound(StorageError):
    """No such job (or, for a client key, not one of its own)."""


class NotCancellable(StorageError):
    """The job has already ended."""


class IdempotencyConflict(StorageError):
    """An Idempotency-Key reused with another body."""


class InvalidTransition(StorageError):
    """A state change _ALLOWED does not allow, or from a state the caller did not expect."""


@dataclasses.dataclass(frozen=True)
class Job:
    n: int                        # arrival order: FIFO within a priority
    id: str
    priority: Priority
    state: JobState
    target: str                   # "any" or one backend's name
    backend: str | None           # the backend running (or that ran) it
    prompt_id: str | None         # ComfyUI prompt id of the current attempt
    attempts: int
    workflow: str                 # the API-format graph, as JSON text
    timeout_s: float | None
    created_at: int               # epoch milliseconds, like the seed
    started_at: int | None
    completed_at: int | None
    updated_at: int
    progress: float
    current_node: str | None
    outputs: Any
    error: Any
    cancel_requested_at: int | None
    extra: dict[str, Any]
    submitted_by: str = ADMIN     # "admin" or a client key's name

    @property
    def status(self) -> str:
        return _PUBLIC_STATUS[self.state]

    @property
    def terminal(self) -> bool:
        return self.state in _TERMINAL

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> Job:
        return cls(
            n=row["n"], id=row["id"], priority=Priority(row["priority"]),
            state=JobState(row["state"]), target=row["target"], backend=row["backend"],
            prompt_id=row["prompt_id"], attempts=row["attempts"], workflow=row["workflow"],
            timeout_s=row["timeout_s"], created_at=row["created_at"],
            started_at=row["started_at"], completed_at=row["completed_at"],
            updated_at=row["updated_at"], progress=row["progress"],
            current_node=row["current_node"],
            outputs=json.loads(row["outputs"]) if row["outputs"] else None,
            error=json.loads(row["error"]) if row["error"] else None,
            cancel_requested_at=row["cancel_requested_at"],
            extra=json.loads(row["extra"]) if row["extra"] else {},
            submitted_by=row["submitted_by"],
        )


@dataclasses.dataclass(frozen=True)
class Event:
    seq: int        # global, strictly increasing, never reused
    job_id: str
    type: str
    ts: int         # epoch milliseconds
    data: dict[str, Any]
    # Who submitted the job: routing for the stream, not part of the event.
    owner: str | None = dataclasses.field(default=None, compare=False)
    # Whether a webhook delivery was written with it (the sender wakes for those only).
    delivers: bool = dataclasses.field(default=False, compare=False)

    def message(self) -> dict[str, Any]:
        """The stream message: the seed's fields plus seq."""
        return {"type": self.type, "seq": self.seq, "workflowId": self.job_id,
                "timestamp": self.ts, **self.data}


def _cancelled(detail: str = "", **where: Any) -> dict[str, Any]:
    """A cancelled job's `error`, with what comfymgr knows of how it ended."""
    return {"code": "cancelled", "message": "cancelled by request" + detail, **where}


def _output_path(item: Mapping[str, Any]) -> str:
    """Where an output file is below its root: "subfolder/filename"."""
    return "/".join(p for p in (item.get("subfolder"), item["filename"]) if p)


# Per-attempt notes live under "attempt"; comfymgr 0.1.0 wrote the two others
# at the top level.
_ATTEMPT_NOTES = ("attempt", "interrupt", "preempting")


def _job_extra(extra: Mapping[str, Any]) -> dict[str, Any]:
    """A job's `extra` without the notes of its current attempt."""
    return {k: v for k, v in extra.items() if k not in _ATTEMPT_NOTES}


###############################################################################
# schema
###############################################################################
# The SQLite schema as forward migrations: the database's PRAGMA user_version
# is how many of _MIGRATIONS ran. DDL is kept as constants, read top to bottom.

_SCHEMA_V1 = """
CREATE TABLE jobs (
    n                   INTEGER PRIMARY KEY,
    id                  TEXT NOT NULL UNIQUE,
    priority            INTEGER NOT NULL,
    state               TEXT NOT NULL,
    status              TEXT NOT NULL,
    target              TEXT NOT NULL,
    backend             TEXT,
    prompt_id           TEXT,
    attempts            INTEGER NOT NULL DEFAULT 0,
    workflow            TEXT NOT NULL,
    timeout_s           REAL,
    created_at          INTEGER NOT NULL,
    started_at          INTEGER,
    completed_at        INTEGER,
    updated_at          INTEGER NOT NULL,
    progress            REAL NOT NULL DEFAULT 0,
    current_node        TEXT,
    outputs             TEXT,
    error               TEXT,
    cancel_requested_at INTEGER,
    extra               TEXT
);
-- Claim: the head of the queue for one target, O(log n).
CREATE INDEX jobs_claim ON jobs (target, priority, n) WHERE state = 'queued';
-- Queue position: jobs ahead within a priority.
CREATE INDEX jobs_queue ON jobs (priority, n) WHERE state = 'queued';
CREATE INDEX jobs_status ON jobs (status, n);
CREATE INDEX jobs_in_flight ON jobs (backend) WHERE state IN ('dispatching', 'submitted', 'running');
CREATE INDEX jobs_prompt ON jobs (prompt_id) WHERE prompt_id IS NOT NULL;

CREATE TABLE events (
    seq     INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id  TEXT NOT NULL,
    type    TEXT NOT NULL,
    ts      INTEGER NOT NULL,
    data    TEXT NOT NULL
);
CREATE INDEX events_job ON events (job_id, seq);

-- Jobs per (state, priority), kept by triggers so that counts and queue
-- positions never need a scan.
CREATE TABLE job_counts (
    state    TEXT NOT NULL,
    priority INTEGER NOT NULL,
    n        INTEGER NOT NULL,
    PRIMARY KEY (state, priority)
) WITHOUT ROWID;
CREATE TRIGGER jobs_counted_insert AFTER INSERT ON jobs BEGIN
    INSERT INTO job_counts (state, priority, n) VALUES (NEW.state, NEW.priority, 1)
        ON CONFLICT (state, priority) DO UPDATE SET n = n + 1;
END;
CREATE TRIGGER jobs_counted_update AFTER UPDATE OF state ON jobs WHEN OLD.state != NEW.state BEGIN
    UPDATE job_counts SET n = n - 1 WHERE state = OLD.state AND priority = OLD.priority;
    INSERT INTO job_counts (state, priority, n) VALUES (NEW.state, NEW.priority, 1)
        ON CONFLICT (state, priority) DO UPDATE SET n = n + 1;
END;
CREATE TRIGGER jobs_counted_delete AFTER DELETE ON jobs BEGIN
    UPDATE job_counts SET n = n - 1 WHERE state = OLD.state AND priority = OLD.priority;
END;
"""

_SCHEMA_V2 = """
-- Which job produced which file (type output|temp, path relative to its root).
CREATE TABLE outputs (
    type    TEXT NOT NULL,
    path    TEXT NOT NULL,
    job_id  TEXT NOT NULL,
    PRIMARY KEY (type, path)
) WITHOUT ROWID;
CREATE INDEX outputs_job ON outputs (job_id);
-- SHA-256 of model files, valid while size and mtime are unchanged.
CREATE TABLE model_hashes (
    path     TEXT PRIMARY KEY,
    size     INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    sha256   TEXT NOT NULL
) WITHOUT ROWID;
-- Retention: finished jobs by age.
CREATE INDEX jobs_finished ON jobs (completed_at) WHERE completed_at IS NOT NULL;
"""

_SCHEMA_V3 = """
-- Webhook deliveries: written in the transaction of the event they carry,
-- so a committed event's delivery survives any crash.
CREATE TABLE deliveries (
    id           TEXT PRIMARY KEY,
    job_id       TEXT NOT NULL,
    event_seq    INTEGER NOT NULL,
    event_type   TEXT NOT NULL,
    url          TEXT NOT NULL,
    payload      TEXT NOT NULL,
    state        TEXT NOT NULL,
    attempts     INTEGER NOT NULL DEFAULT 0,
    next_at      INTEGER NOT NULL,
    created_at   INTEGER NOT NULL,
    delivered_at INTEGER,
    last_status  INTEGER,
    last_error   TEXT
);
CREATE INDEX deliveries_due ON deliveries (next_at) WHERE state = 'pending';
CREATE INDEX deliveries_job ON deliveries (job_id);
-- Idempotency-Key of submits, scoped by the API key that sent them.
CREATE TABLE idempotency (
    key        TEXT PRIMARY KEY,
    body_hash  TEXT NOT NULL,
    job_id     TEXT NOT NULL,
    created_at INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX idempotency_age ON idempotency (created_at);
"""

_QUEUE_BLOCK = 4096  # arrival numbers per queue_blocks row

_SCHEMA_V4 = f"""
-- Queued jobs per (priority, block of {_QUEUE_BLOCK} arrival numbers), kept by
-- triggers: a queue position then sums block counts and counts only within
-- its own block, instead of counting every job ahead of it (a job at the
-- back of a 1M queue: from ~100 ms to well under one).
CREATE TABLE queue_blocks (
    priority INTEGER NOT NULL,
    block    INTEGER NOT NULL,
    n        INTEGER NOT NULL,
    PRIMARY KEY (priority, block)
) WITHOUT ROWID;
CREATE TRIGGER jobs_blocks_insert AFTER INSERT ON jobs WHEN NEW.state = 'queued' BEGIN
    INSERT INTO queue_blocks (priority, block, n) VALUES (NEW.priority, NEW.n / {_QUEUE_BLOCK}, 1)
        ON CONFLICT (priority, block) DO UPDATE SET n = n + 1;
END;
CREATE TRIGGER jobs_blocks_leave AFTER UPDATE OF state ON jobs
        WHEN OLD.state = 'queued' AND NEW.state != 'queued' BEGIN
    UPDATE queue_blocks SET n = n - 1 WHERE priority = OLD.priority AND block = OLD.n / {_QUEUE_BLOCK};
END;
CREATE TRIGGER jobs_blocks_enter AFTER UPDATE OF state ON jobs
        WHEN OLD.state != 'queued' AND NEW.state = 'queued' BEGIN
    INSERT INTO queue_blocks (priority, block, n) VALUES (NEW.priority, NEW.n / {_QUEUE_BLOCK}, 1)
        ON CONFLICT (priority, block) DO UPDATE SET n = n + 1;
END;
CREATE TRIGGER jobs_blocks_delete AFTER DELETE ON jobs WHEN OLD.state = 'queued' BEGIN
    UPDATE queue_blocks SET n = n - 1 WHERE priority = OLD.priority AND block = OLD.n / {_QUEUE_BLOCK};
END;
INSERT INTO queue_blocks (priority, block, n)
    SELECT priority, n / {_QUEUE_BLOCK}, COUNT(*) FROM jobs WHERE state = 'queued'
    GROUP BY priority, n / {_QUEUE_BLOCK};
"""

_SCHEMA_V5 = """
-- Who submitted a job: "admin", or the name of a client key (COMFYMGR_CLIENT_KEYS),
-- which sees only its own jobs.
ALTER TABLE jobs ADD COLUMN submitted_by TEXT NOT NULL DEFAULT 'admin';
CREATE INDEX jobs_owner ON jobs (submitted_by, n);
CREATE INDEX jobs_owner_state ON jobs (submitted_by, state, priority);
"""

# Forward migrations; the database's PRAGMA user_version is how many ran.
_MIGRATIONS: tuple[str, ...] = (_SCHEMA_V1, _SCHEMA_V2, _SCHEMA_V3, _SCHEMA_V4, _SCHEMA_V5)

###############################################################################
# storage: jobs
###############################################################################
# SQLite through the stdlib. Storage is synchronous and narrow, with no
# asyncio inside: the event loop reaches it only through _Database (next
# section), whose single worker thread owns the connection. Every change goes
# through one explicit BEGIN IMMEDIATE transaction (a SAVEPOINT when batched),
# and every job state change goes through Storage._transition(), which checks
# it against _ALLOWED and writes the job row and its event row together.

_log_storage = logging.getLogger("comfymgr.storage")

_JOB_COLUMNS = frozenset({
    "backend", "prompt_id", "attempts", "started_at", "completed_at", "progress",
    "current_node", "outputs", "error", "cancel_requested_at", "extra"})
_JSON_COLUMNS = frozenset({"outputs", "error", "extra"})


class _JobStore:
    """The jobs and their events: the verbs of a job's life and the reads;
    Storage (next section) adds what is kept around them."""

    def __init__(self, path: str | Path, *, synchronous: str = "full",
                 busy_timeout_ms: int = 5000) -> None:
        self.path = Path(path)
        self.on_commit: Callable[[list[Event]], None] = lambda events: None
        self._pending: list[Event] = []
        self._depth = 0
        self._conn = sqlite3.connect(str(self.path), isolation_level=None)
        self._conn.row_factory = sqlite3.Row
        self._conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
        if self._conn.execute("PRAGMA journal_mode = WAL").fetchone()[0].lower() != "wal":
            raise sqlite3.OperationalError(f"{self.path}: cannot use WAL journal mode")
        self._conn.execute(f"PRAGMA synchronous = {synchronous.upper()}")
        self._migrate()

    def close(self) -> None:
        self._conn.close()

    # -- schema ----------------------------------------------------------------

    def _migrate(self) -> None:
        current = self._conn.execute("PRAGMA user_version").fetchone()[0]
        if current > len(_MIGRATIONS):
            raise SchemaTooNew(
                f"{self.path} has schema version {current}, newer than this comfymgr "
                f"understands ({len(_MIGRATIONS)}); run a newer comfymgr")
        for version in range(current + 1, len(_MIGRATIONS) + 1):
            _log_storage.info("migrating %s to schema version %d", self.path, version)
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                for statement in _split_sql(_MIGRATIONS[version - 1]):
                    self._conn.execute(statement)
                self._conn.execute(f"PRAGMA user_version = {version}")
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise

    @property
    def schema_version(self) -> int:
        return self._conn.execute("PRAGMA user_version").fetchone()[0]

    # -- transactions ------------------------------------------------------------

    @contextlib.contextmanager
    def transaction(self) -> Iterable[None]:
        """BEGIN IMMEDIATE ... COMMIT, or a SAVEPOINT when one is already open.
        Any exception rolls back (to the savepoint) and drops its events."""
        if self._depth:
            name = f"sp{self._depth}"
            mark = len(self._pending)
            self._conn.execute(f"SAVEPOINT {name}")
            self._depth += 1
            try:
                yield
            except BaseException:
                # A full disk or an I/O error makes SQLite roll the whole
                # transaction back itself: then there is no savepoint to go
                # back to, and the original error is the one to report.
                if self._conn.in_transaction:
                    self._conn.execute(f"ROLLBACK TO {name}")
                    self._conn.execute(f"RELEASE {name}")
                del self._pending[mark:]
                raise
            else:
                self._conn.execute(f"RELEASE {name}")
            finally:
                self._depth -= 1
            return
        self._conn.execute("BEGIN IMMEDIATE")
        self._depth = 1
        try:
            yield
            self._conn.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):  # a failed COMMIT may have rolled back
                self._conn.execute("ROLLBACK")
            self._pending.clear()
            raise
        finally:
            self._depth = 0
        events, self._pending = self._pending, []
        if events:
            self.on_commit(events)

    def run_batch(self, ops: Sequence[Callable[[], Any]]) -> list[tuple[bool, Any]]:
        """Run several writes in one transaction (one fsync), each in its own
        savepoint so that one failing op does not undo the others. Returns
        (ok, result-or-exception) per op; if the commit fails, every op fails."""
        outcomes: list[tuple[bool, Any]] = []
        try:
            with self.transaction():
                for op in ops:
                    try:
                        with self.transaction():
                            result = op()
                    except Exception as exc:  # handed to the op's caller
                        if not self._conn.in_transaction:
                            # SQLite rolled the whole batch back (disk full, I/O error):
                            # the ops before this one are undone too, and the ones after
                            # it must not run in autocommit, each committed alone.
                            if isinstance(exc, sqlite3.Error):
                                raise
                            raise sqlite3.OperationalError(str(exc)) from exc
                        outcomes.append((False, exc))
                    else:
                        outcomes.append((True, result))
        except sqlite3.Error as exc:
            return [(False, exc)] * len(ops)
        return outcomes

    def _event(self, job_id: str, type_: str, ts: int, data: dict[str, Any], owner: str,
               webhook: Mapping[str, Any] | None = None) -> Event:
        cur = self._conn.execute("INSERT INTO events (job_id, type, ts, data) VALUES (?, ?, ?, ?)",
                                 (job_id, type_, ts, _dumps(data)))
        delivers = bool(webhook) and type_.removeprefix("workflow:") in webhook.get("events", ())
        event = Event(cur.lastrowid, job_id, type_, ts, data, owner, delivers)
        self._pending.append(event)
        if delivers:
            self._conn.execute(
                "INSERT INTO deliveries (id, job_id, event_seq, event_type, url, payload, state, "
                "next_at, created_at) VALUES (?, ?, ?, ?, ?, ?, 'pending', ?, ?)",
                ("msg_" + uuid.uuid4().hex, job_id, event.seq, type_, webhook["url"],
                 _dumps(event.message()), ts, ts))
        return event

    # -- jobs --------------------------------------------------------------------

    def enqueue(self, job_id: str, workflow: str, priority: Priority, target: str,
                now: int, *, timeout_s: float | None = None,
                extra: dict[str, Any] | None = None, owner: str = ADMIN) -> tuple[Job, int]:
        """Insert a queued job; returns it and its 1-based queue position."""
        with self.transaction():
            cur = self._conn.execute(
                "INSERT INTO jobs (id, priority, state, status, target, workflow, timeout_s, "
                "created_at, updated_at, extra, submitted_by) "
                "VALUES (?, ?, 'queued', 'queued', ?, ?, ?, ?, ?, ?, ?)",
                (job_id, int(priority), target, workflow, timeout_s, now, now,
                 _dumps(extra) if extra else None, owner))
            position = self._conn.execute(
                "SELECT COALESCE(SUM(n), 0) FROM job_counts WHERE state = 'queued' AND priority <= ?",
                (int(priority),)).fetchone()[0]
            job = Job(n=cur.lastrowid, id=job_id, priority=priority, state=JobState.QUEUED,
                      target=target, backend=None, prompt_id=None, attempts=0,
                      workflow=workflow, timeout_s=timeout_s, created_at=now, started_at=None,
                      completed_at=None, updated_at=now, progress=0.0, current_node=None,
                      outputs=None, error=None, cancel_requested_at=None, extra=extra or {},
                      submitted_by=owner)
            self._event(job_id, "workflow:queued", now, {
                "status": "queued", "priority": priority.label, "queuePosition": position},
                owner, webhook=job.extra.get("webhook"))
        return job, position

    def enqueue_once(self, key: str, body_hash: str, ttl_ms: int, job_id: str, workflow: str,
                     priority: Priority, target: str, now: int, **kwargs: Any
                     ) -> tuple[Job, int | None, bool]:
        """enqueue() under an idempotency key: the same key and body within
        the TTL return the original job (replayed=True); the same key with
        another body is refused. Check and insert share one transaction, so
        concurrent retries make one job."""
        with self.transaction():
            row = self._conn.execute("SELECT body_hash, job_id, created_at FROM idempotency "
                                     "WHERE key = ?", (key,)).fetchone()
            if row is not None and row["created_at"] >= now - ttl_ms:
                if row["body_hash"] != body_hash:
                    raise IdempotencyConflict(
                        "this Idempotency-Key was used with a different request body",
                        workflowId=row["job_id"])
                original = self.get(row["job_id"])
                if original is not None:
                    return original, self.position(original), True
            job, position = self.enqueue(job_id, workflow, priority, target, now, **kwargs)
            self._conn.execute("INSERT OR REPLACE INTO idempotency VALUES (?, ?, ?, ?)",
                               (key, body_hash, job_id, now))
        return job, position, False

    def get(self, job_id: str, owner: str | None = None) -> Job | None:
        """The job; with `owner`, only if that key name submitted it."""
        row = self._conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None or (owner is not None and row["submitted_by"] != owner):
            return None
        return Job.from_row(row)

    def job_and_position(self, job_id: str, owner: str | None = None) -> tuple[Job, int | None]:
        """A job and its queue position; JobNotFound when there is none (or,
        with `owner`, none of that key name's)."""
        job = self.get(job_id, owner)
        if job is None:
            raise JobNotFound(f"workflow {job_id} not found", workflowId=job_id)
        return job, self.position(job)

    def get_many(self, job_ids: Sequence[str], owner: str | None = None) -> dict[str, Job]:
        """The jobs of these ids that exist (and are `owner`'s, if given)."""
        found = {}
        for job_id in job_ids:
            job = self.get(job_id, owner)
            if job is not None:
                found[job_id] = job
        return found

    def position(self, job: Job) -> int | None:
        """1-based place in comfymgr's queue (1 = dispatched next), None when not queued.
        Cost: the counts of the higher priorities, the block counts of its
        own priority before its block, and an index range within its block."""
        if job.state is not JobState.QUEUED:
            return None
        return self.positions([job])[job.id]

    def positions(self, jobs: Sequence[Job]) -> dict[str, int]:
        """Queue positions of the queued jobs among `jobs`, in one pass per
        priority: each job's count continues from the previous one's."""
        out: dict[str, int] = {}
        for priority in Priority:
            queued = sorted((j for j in jobs if j.state is JobState.QUEUED and j.priority is priority),
                            key=lambda j: j.n)
            if not queued:
                continue
            first_block = queued[0].n // _QUEUE_BLOCK
            position = self._conn.execute(
                "SELECT COALESCE(SUM(n), 0) FROM job_counts WHERE state = 'queued' AND priority < ?",
                (int(priority),)).fetchone()[0]
            position += self._conn.execute(
                "SELECT COALESCE(SUM(n), 0) FROM queue_blocks WHERE priority = ? AND block < ?",
                (int(priority), first_block)).fetchone()[0]
            last = first_block * _QUEUE_BLOCK - 1  # counted up to here
            for job in queued:
                position += self._count_queued(priority, last, job.n)
                out[job.id] = position
                last = job.n
        return out

    def _count_queued(self, priority: Priority, after: int, upto: int) -> int:
        """Queued jobs of `priority` with after < n <= upto: whole blocks from
        queue_blocks, the ragged ends from the index."""
        first, last = (after + 1) // _QUEUE_BLOCK, upto // _QUEUE_BLOCK
        if last - first < 2:
            return self._conn.execute(
                "SELECT COUNT(*) FROM jobs WHERE state = 'queued' AND priority = ? AND n > ? AND n <= ?",
                (int(priority), after, upto)).fetchone()[0]
        head_end, tail_start = (first + 1) * _QUEUE_BLOCK - 1, last * _QUEUE_BLOCK
        return (self._conn.execute(
                    "SELECT COUNT(*) FROM jobs WHERE state = 'queued' AND priority = ? AND n > ? AND n <= ?",
                    (int(priority), after, head_end)).fetchone()[0]
                + self._conn.execute(
                    "SELECT COALESCE(SUM(n), 0) FROM queue_blocks WHERE priority = ? AND block > ? "
                    "AND block < ?", (int(priority), first, last)).fetchone()[0]
                + self._conn.execute(
                    "SELECT COUNT(*) FROM jobs WHERE state = 'queued' AND priority = ? AND n >= ? AND n <= ?",
                    (int(priority), tail_start, upto)).fetchone()[0])

    def list_page(self, **query: Any) -> tuple[list[Job], dict[str, int]]:
        """A page of list_jobs with the queue positions of its queued jobs."""
        jobs = self.list_jobs(**query)
        return jobs, self.positions(jobs)

    def list_jobs(self, *, statuses: Sequence[str] = (), priority: Priority | None = None,
                  before: int | None = None, limit: int = 50, owner: str | None = None) -> list[Job]:
        """Newest first; `before` is the keyset cursor (a job's n); `owner`:
        only the jobs that key name submitted."""
        where, args = [], []
        if owner is not None:
            where.append("submitted_by = ?")
            args.append(owner)
        if statuses:
            where.append(f"status IN ({','.join('?' * len(statuses))})")
            args.extend(statuses)
        if priority is not None:
            where.append("priority = ?")
            args.append(int(priority))
        if before is not None:
            where.append("n < ?")
            args.append(before)
        sql = "SELECT * FROM jobs"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY n DESC LIMIT ?"
        args.append(limit)
        return [Job.from_row(row) for row in self._conn.execute(sql, args)]

    def queue_head(self, backend: str, *, pinned_only: bool = False) -> tuple[int, int] | None:
        """(priority, n) of the job `backend` would claim next (with
        pinned_only, of those submitted for it alone): index probes."""
        heads = [self._conn.execute(
            "SELECT priority, n FROM jobs WHERE state = 'queued' AND target = ? "
            "ORDER BY priority, n LIMIT 1", (target,)).fetchone()
            for target in ((backend,) if pinned_only else (TARGET_ANY, backend))]
        found = [(row[0], row[1]) for row in heads if row]
        return min(found) if found else None

    def claim(self, backend: str, prompt_id: str, now: int, *,
              pinned_only: bool = False) -> tuple[Job | None, bool]:
        """Atomically take the next queued job this backend may run (priority,
        then age; jobs for "any" backend and for this one, or with
        pinned_only for this one alone) and mark it dispatching with a
        freshly minted prompt id, stored before any POST. Returns the job
        (None when none waits) and whether another waits for this backend
        after it (the dispatcher need not ask again before more are queued)."""
        with self.transaction():
            head = self.queue_head(backend, pinned_only=pinned_only)
            if head is None:
                return None, False
            row = self._conn.execute("SELECT id, attempts, extra FROM jobs WHERE n = ?",
                                     (head[1],)).fetchone()
            extra = _job_extra(json.loads(row["extra"]) if row["extra"] else {})
            job = self._transition(row["id"], JobState.DISPATCHING, now, expect=(JobState.QUEUED,),
                                   backend=backend, prompt_id=prompt_id,
                                   attempts=row["attempts"] + 1, progress=0.0, current_node=None,
                                   extra=extra or None)
            return job, self.queue_head(backend, pinned_only=pinned_only) is not None

    def _transition(self, job_id: str, to: JobState, now: int, *,
                   expect: Iterable[JobState] | None = None,
                   event: dict[str, Any] | None = None, **fields: Any) -> Job:
        """The one way a job changes state: checks the move against _ALLOWED
        (and `expect`, the states the caller believes the job is in), writes
        the row and the state's event in one transaction, returns the job.
        The verbs below (claim, mark, end, requeue, cancel) are built on it."""
        unknown = set(fields) - _JOB_COLUMNS
        if unknown:
            raise TypeError(f"not job columns: {sorted(unknown)}")
        with self.transaction():
            job = self.get(job_id)
            if job is None:
                raise JobNotFound(f"workflow {job_id} not found", workflowId=job_id)
            if (expect is not None and job.state not in set(expect)) or to not in _ALLOWED[job.state]:
                raise InvalidTransition(
                    f"workflow {job_id} is {job.state.value}; it cannot become {to.value}",
                    workflowId=job_id, state=job.state.value, to=to.value)
            values = {"state": to.value, "status": _PUBLIC_STATUS[to], "updated_at": now}
            for name, value in fields.items():
                values[name] = _dumps(value) if name in _JSON_COLUMNS and value is not None else value
            assignments = ", ".join(f"{name} = ?" for name in values)
            self._conn.execute(f"UPDATE jobs SET {assignments} WHERE n = ?", (*values.values(), job.n))
            job = Job.from_row(self._conn.execute("SELECT * FROM jobs WHERE n = ?", (job.n,)).fetchone())
            if to is JobState.COMPLETED and job.outputs:
                self._conn.executemany(
                    "INSERT OR REPLACE INTO outputs (type, path, job_id) VALUES (?, ?, ?)",
                    [(o["type"], _output_path(o), job.id)
                     for o in job.outputs])
            if to in _EVENT_FOR_STATE:
                data = {"status": job.status, **(event or {})}
                if to is JobState.QUEUED:
                    data.setdefault("priority", job.priority.label)
                    data.setdefault("queuePosition", self.position(job))
                self._event(job.id, _EVENT_FOR_STATE[to], now, data, job.submitted_by,
                            webhook=job.extra.get("webhook"))
        return job

    def request_cancel(self, job_id: str, now: int, owner: str | None = None) -> Job:
        """Cancel a queued job at once; mark an in-flight one for the bridge
        to interrupt. A finished job cannot be cancelled (Conflict)."""
        with self.transaction():
            job = self.get(job_id, owner)
            if job is None:
                raise JobNotFound(f"workflow {job_id} not found", workflowId=job_id)
            if job.terminal:
                raise NotCancellable(f"workflow {job_id} already {job.status}; there is nothing to "
                                     "cancel", workflowId=job_id, status=job.status)
            if job.state is JobState.QUEUED:
                return self._cancel_unstarted(job_id, now)
            if job.cancel_requested_at is None:
                self._conn.execute("UPDATE jobs SET cancel_requested_at = ?, updated_at = ? WHERE n = ?",
                                   (now, now, job.n))
                job = dataclasses.replace(job, cancel_requested_at=now, updated_at=now)
            return job

    # -- a job's life on a backend ------------------------------------------------
    # Each verb names the attempt (the prompt id) it is about and does nothing,
    # returning None, when the job has moved on: ended, queued again, or on a
    # later attempt. A late answer from ComfyUI can therefore never change a
    # job that comfymgr has already settled.

    def _attempt(self, job_id: str, prompt_id: str) -> Job | None:
        job = self.get(job_id)
        if job is None or job.state not in _IN_FLIGHT or job.prompt_id != prompt_id:
            return None
        return job

    def mark_submitted(self, job_id: str, prompt_id: str, now: int) -> Job | None:
        """ComfyUI acknowledged the POST: the prompt waits in its queue."""
        with self.transaction():
            job = self._attempt(job_id, prompt_id)
            if job is None or job.state is not JobState.DISPATCHING:
                return None
            return self._transition(job_id, JobState.SUBMITTED, now)

    def mark_running(self, job_id: str, prompt_id: str, now: int, backend: str) -> Job | None:
        """ComfyUI started the prompt."""
        with self.transaction():
            job = self._attempt(job_id, prompt_id)
            if job is None or job.state is JobState.RUNNING:
                return None
            return self._transition(job_id, JobState.RUNNING, now, started_at=now,
                                   event={"startTime": now, "backend": backend})

    def adopt_prompt_id(self, job_id: str, prompt_id: str, new_id: str, now: int) -> Job | None:
        """ComfyUI ran the prompt under an id of its own choosing (an old
        server): follow that one."""
        with self.transaction():
            job = self._attempt(job_id, prompt_id)
            if job is None:
                return None
            self._conn.execute("UPDATE jobs SET prompt_id = ?, updated_at = ? WHERE n = ?",
                               (new_id, now, job.n))
            return dataclasses.replace(job, prompt_id=new_id, updated_at=now)

    def note_attempt(self, job_id: str, prompt_id: str, now: int, **values: Any) -> None:
        """Bookkeeping of this attempt only (why it was interrupted, that it
        is being taken back); cleared when the job is queued again."""
        with self.transaction():
            job = self._attempt(job_id, prompt_id)
            if job is not None:
                extra = {**job.extra, "attempt": {**job.extra.get("attempt", {}), **values}}
                self._conn.execute("UPDATE jobs SET extra = ?, updated_at = ? WHERE n = ?",
                                   (_dumps(extra), now, job.n))

    def end_run(self, job_id: str, prompt_id: str, to: JobState, now: int, *, backend: str,
                outputs: list[dict[str, Any]] | None = None, error: dict[str, Any] | None = None,
                progress: tuple[float, str | None] | None = None) -> Job | None:
        """The attempt ended: `progress` (the last value seen, not yet
        written) first, then the end with its event."""
        with self.transaction():
            job = self._attempt(job_id, prompt_id)
            if job is None:
                return None
            if progress is not None:
                self.set_progress(job_id, progress[0], progress[1], now, emit=True)
            fields: dict[str, Any] = {"completed_at": now}
            event: dict[str, Any] = {"completionTime": now, "backend": backend}
            if job.started_at is not None:
                event["startTime"] = job.started_at
            if to is JobState.COMPLETED:
                fields.update(outputs=outputs or [], progress=100.0)
                event["outputs"] = outputs or []
            if error is not None:
                fields["error"] = event["error"] = error
            return self._transition(job_id, to, now, event=event, **fields)

    def requeue_run(self, job_id: str, prompt_id: str, now: int, *, reason: str | None = None,
                    count: str | None = None, allowed: int = 0,
                    error: dict[str, Any] | None = None) -> Job | None:
        """The attempt is over without a result: the job goes back to its
        place in the queue, its per-attempt notes cleared. With `count`, that
        counter of the job goes up first, and once it exceeds `allowed` the
        job fails with `error` instead. A job whose cancel was requested ends
        cancelled: it never ran."""
        with self.transaction():
            job = self._attempt(job_id, prompt_id)
            if job is None:
                return None
            if job.cancel_requested_at is not None:
                return self._cancel_unstarted(job_id, now)
            extra = _job_extra(job.extra)
            if count is not None:
                extra[count] = int(extra.get(count, 0)) + 1
                if extra[count] > allowed:
                    return self._transition(job_id, JobState.FAILED, now, completed_at=now,
                                           error=error, extra=extra, event={"error": error})
            return self._transition(job_id, JobState.QUEUED, now, backend=None, prompt_id=None,
                                   started_at=None, progress=0.0, current_node=None,
                                   extra=extra or None,
                                   event={"reason": reason} if reason else None)

    def _cancel_unstarted(self, job_id: str, now: int) -> Job:
        error = _cancelled()
        return self._transition(job_id, JobState.CANCELLED, now, completed_at=now, error=error,
                                event={"reason": error["message"]})

    def fail_orphans(self, backends: Sequence[str], now: int) -> list[Job]:
        """Unfinished jobs bound to a backend that is no longer configured
        would wait forever: they fail with backend_lost."""
        failed = []
        with self.transaction():
            for job_id in self._orphaned(backends):
                job = self.get(job_id)
                assert job is not None
                error = {"code": "backend_lost", "message": f"backend "
                         f"{job.backend or job.target!r} is no longer configured"}
                failed.append(self._transition(job_id, JobState.FAILED, now, completed_at=now,
                                              error=error, event={"error": error}))
        return failed

    def set_progress(self, job_id: str, progress: float, current_node: str | None, now: int,
                     *, emit: bool) -> Event | None:
        """Record a running job's progress; write a progress event when `emit`
        (the caller throttles, see decision 5 of the design)."""
        with self.transaction():
            cur = self._conn.execute(
                "UPDATE jobs SET progress = ?, current_node = ?, updated_at = ? "
                "WHERE id = ? AND state = 'running'", (progress, current_node, now, job_id))
            if not cur.rowcount or not emit:
                return None
            owner = self._conn.execute("SELECT submitted_by FROM jobs WHERE id = ?",
                                       (job_id,)).fetchone()[0]
            return self._event(job_id, EVENT_PROGRESS, now, {
                "status": "running", "progress": progress, "currentNode": current_node}, owner)

    def _orphaned(self, backends: Sequence[str]) -> list[str]:
        """Ids of unfinished jobs bound to a backend not in `backends`."""
        targets, names = [TARGET_ANY, *backends], list(backends)
        rows = self._conn.execute(
            f"SELECT id FROM jobs WHERE state = 'queued' AND target NOT IN "
            f"({','.join('?' * len(targets))}) UNION ALL SELECT id FROM jobs WHERE state IN "
            f"('dispatching', 'submitted', 'running') AND backend NOT IN "
            f"({','.join('?' * len(names))})", (*targets, *names)).fetchall()
        return [row[0] for row in rows]

    def in_flight(self, backend: str | None = None) -> list[Job]:
        """Jobs handed to a backend and not finished: what a restart must
        reconcile with ComfyUI."""
        sql = "SELECT * FROM jobs WHERE state IN ('dispatching', 'submitted', 'running')"
        args: tuple[Any, ...] = ()
        if backend is not None:
            sql += " AND backend = ?"
            args = (backend,)
        return [Job.from_row(row) for row in self._conn.execute(sql + " ORDER BY n", args)]

    def _oldest_queued_at(self) -> int | None:
        """created_at of the job waiting longest: one index probe per priority."""
        heads = [self._conn.execute(
            "SELECT MIN(n) FROM jobs WHERE state = 'queued' AND priority = ?", (int(p),)).fetchone()[0]
            for p in Priority]
        heads = [n for n in heads if n is not None]
        if not heads:
            return None
        return self._conn.execute("SELECT created_at FROM jobs WHERE n = ?", (min(heads),)).fetchone()[0]

    def counts(self, owner: str | None = None) -> dict[tuple[JobState, Priority], int]:
        """Jobs per (state, priority): of everyone from the counts table, or
        of one key name from its index."""
        if owner is None:
            rows = self._conn.execute("SELECT state, priority, n FROM job_counts")
        else:
            rows = self._conn.execute("SELECT state, priority, COUNT(*) AS n FROM jobs "
                                      "WHERE submitted_by = ? GROUP BY state, priority", (owner,))
        return {(JobState(row["state"]), Priority(row["priority"])): row["n"] for row in rows}

    # -- events ------------------------------------------------------------------

    def events_since(self, seq: int, *, job_ids: Sequence[str] | None = None,
                     owner: str | None = None, limit: int = 1000) -> list[Event]:
        sql, args = "SELECT * FROM events WHERE seq > ?", [seq]
        if job_ids is not None:
            sql += f" AND job_id IN ({','.join('?' * len(job_ids))})"
            args.extend(job_ids)
        if owner is not None:
            sql += " AND job_id IN (SELECT id FROM jobs WHERE submitted_by = ?)"
            args.append(owner)
        sql += " ORDER BY seq LIMIT ?"
        args.append(limit)
        return [Event(row["seq"], row["job_id"], row["type"], row["ts"], json.loads(row["data"]))
                for row in self._conn.execute(sql, args)]

    def event_bounds(self) -> tuple[int, int]:
        """(oldest stored seq, latest seq ever written); (0, 0) when none."""
        oldest = self._conn.execute("SELECT MIN(seq) FROM events").fetchone()[0]
        latest = self._conn.execute(
            "SELECT seq FROM sqlite_sequence WHERE name = 'events'").fetchone()
        return (oldest or 0, latest[0] if latest else 0)


###############################################################################
# storage: around jobs
###############################################################################
# What Storage keeps beside the jobs themselves: the webhook deliveries of
# their events, the files they produced and the models' hashes, retention,
# and the figures /v1/status and /metrics read.


class Storage(_JobStore):
    """Jobs and events in one SQLite file (WAL).

    The verbs of a job's life, each one transaction that changes the job's
    state through _transition() with its event: enqueue, enqueue_once,
    claim, mark_submitted, mark_running, adopt_prompt_id, note_attempt,
    set_progress, end_run, requeue_run, request_cancel, fail_orphans.
    Reads: get, get_many, job_and_position, position(s), list_jobs,
    list_page, queue_head, in_flight, counts, stats; events_since,
    event_bounds. Around jobs: webhook deliveries (due_deliveries,
    next_delivery_at, record_attempt, deliveries_for), files (outputs,
    model_hashes, store_model_hash), retention (delete_expired,
    prune_events, prune_idempotency). Writes run in their own BEGIN
    IMMEDIATE transaction, or as a savepoint inside run_batch(); events
    written by a transaction are handed to `on_commit` only once it has
    committed, in seq order. What it refuses raises a StorageError of its
    own (JobNotFound, ...); the HTTP layer gives those their status.
    """

    # -- webhook deliveries ---------------------------------------------------------

    def prune_idempotency(self, before_ms: int) -> int:
        with self.transaction():
            return self._conn.execute("DELETE FROM idempotency WHERE created_at < ?",
                                      (before_ms,)).rowcount

    def due_deliveries(self, now: int, *, limit: int = 50) -> list[sqlite3.Row]:
        return self._conn.execute(
            "SELECT * FROM deliveries WHERE state = 'pending' AND next_at <= ? "
            "ORDER BY next_at LIMIT ?", (now, limit)).fetchall()

    def next_delivery_at(self) -> int | None:
        return self._conn.execute(
            "SELECT MIN(next_at) FROM deliveries WHERE state = 'pending'").fetchone()[0]

    def record_attempt(self, delivery_id: str, now: int, *, state: str, status: int | None,
                       error: str | None, next_at: int | None) -> None:
        with self.transaction():
            self._conn.execute(
                "UPDATE deliveries SET attempts = attempts + 1, state = ?, last_status = ?, "
                "last_error = ?, next_at = COALESCE(?, next_at), delivered_at = ? WHERE id = ?",
                (state, status, error, next_at, now if state == "delivered" else None, delivery_id))

    def deliveries_for(self, job_id: str) -> list[sqlite3.Row]:
        return self._conn.execute(
            "SELECT * FROM deliveries WHERE job_id = ? ORDER BY event_seq", (job_id,)).fetchall()

    # -- files -----------------------------------------------------------------------

    def outputs(self, type_: str, *, paths: Sequence[str] | None = None,
                owner: str | None = None) -> dict[str, str]:
        """path -> the job that produced it, for the files of one type (only
        `paths`, only the jobs of `owner`, when given)."""
        sql = "SELECT o.path, o.job_id FROM outputs o"
        args: list[Any] = []
        where = ["o.type = ?"]
        if owner is not None:
            sql += " JOIN jobs j ON j.id = o.job_id"
            where.append("j.submitted_by = ?")
            args.append(owner)
        if paths is None:
            return dict(self._conn.execute(f"{sql} WHERE {' AND '.join(where)}", (type_, *args)).fetchall())
        found: dict[str, str] = {}
        for start in range(0, len(paths), 500):
            chunk = list(paths[start:start + 500])
            found.update(self._conn.execute(
                f"{sql} WHERE {' AND '.join(where)} AND o.path IN ({','.join('?' * len(chunk))})",
                (type_, *args, *chunk)).fetchall())
        return found

    def model_hashes(self) -> dict[str, tuple[int, int, str]]:
        return {row[0]: (row[1], row[2], row[3]) for row in self._conn.execute(
            "SELECT path, size, mtime_ns, sha256 FROM model_hashes")}

    def store_model_hash(self, path: str, size: int, mtime_ns: int, sha256: str) -> None:
        with self.transaction():
            self._conn.execute("INSERT OR REPLACE INTO model_hashes VALUES (?, ?, ?, ?)",
                               (path, size, mtime_ns, sha256))

    # -- retention -------------------------------------------------------------------

    def delete_expired(self, before_ms: int, *, limit: int = 500) -> tuple[list[Job], int]:
        """Remove up to `limit` finished jobs that ended before `before_ms`,
        oldest first, with their events, output records and deliveries;
        returns the jobs removed (their files are the caller's) and how
        many events went with them."""
        events = 0
        with self.transaction():
            jobs = [Job.from_row(row) for row in self._conn.execute(
                "SELECT * FROM jobs WHERE completed_at IS NOT NULL AND completed_at < ? "
                "AND state IN ('completed', 'failed', 'cancelled') ORDER BY completed_at LIMIT ?",
                (before_ms, limit))]
            for job in jobs:
                self._conn.execute("DELETE FROM jobs WHERE n = ?", (job.n,))
                events += self._conn.execute("DELETE FROM events WHERE job_id = ?",
                                             (job.id,)).rowcount
                self._conn.execute("DELETE FROM outputs WHERE job_id = ?", (job.id,))
                self._conn.execute("DELETE FROM deliveries WHERE job_id = ?", (job.id,))
        return jobs, events

    def prune_events(self, before_ms: int, *, limit: int = 10_000) -> int:
        """Delete up to `limit` events older than `before_ms`; returns how many."""
        # Events are written in time order, so the old ones are a prefix in seq
        # order: read that prefix by the primary key instead of scanning on ts.
        with self.transaction():
            last = None
            for seq, ts in self._conn.execute(
                    "SELECT seq, ts FROM events ORDER BY seq LIMIT ?", (limit,)):
                if ts >= before_ms:
                    break
                last = seq
            if last is None:
                return 0
            return self._conn.execute("DELETE FROM events WHERE seq <= ?", (last,)).rowcount

    # -- housekeeping ----------------------------------------------------------------

    def ping(self) -> bool:
        return self._conn.execute("SELECT 1").fetchone()[0] == 1

    def stats(self, owner: str | None = None) -> dict[str, Any]:
        """Counts per (state, priority), the oldest queued job's time, the
        file's size and schema version: what /v1/status and /metrics show."""
        return {"counts": self.counts(owner), "oldest_queued_at": self._oldest_queued_at(),
                "size_bytes": self._size_bytes(), "schema_version": self.schema_version}

    def _size_bytes(self) -> int:
        total = 0
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(OSError):
                total += os.path.getsize(f"{self.path}{suffix}")
        return total


def _split_sql(script: str) -> list[str]:
    """Statements of a DDL script (triggers contain ';' inside BEGIN ... END)."""
    statements, buffer = [], ""
    for line in script.splitlines():
        if line.strip().startswith("--") or not line.strip():
            continue
        buffer += line + "\n"
        if sqlite3.complete_statement(buffer):
            statements.append(buffer.strip())
            buffer = ""
    if buffer.strip():
        statements.append(buffer.strip())
    return statements


###############################################################################
# database
###############################################################################
# The event loop's way to Storage: one worker thread, group commit.


class _Call:
    """One call queued to the database thread: Storage verb, its arguments,
    whether it writes, and the loop's future for its outcome."""

    __slots__ = ("verb", "args", "kwargs", "write", "future")

    def __init__(self, verb: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
                 write: bool) -> None:
        self.verb, self.args, self.kwargs, self.write = verb, args, kwargs, write
        self.future: asyncio.Future[Any] | None = None

    def bind(self, storage: Storage) -> Callable[[], Any]:
        return functools.partial(self.verb, storage, *self.args, **self.kwargs)


class _Database:
    """The event loop's door to Storage.

    Concurrency rule: one worker thread owns the sqlite3 connection for its
    whole life; the event loop never touches disk. Calls are queued to that
    thread; consecutive writes are committed together in one transaction
    (group commit: one fsync for many submits), each in its own savepoint.
    Events a commit produced are handed to the loop (call_soon_threadsafe)
    before the callers' futures are resolved, in seq order, so subscribers
    always hear of a job no later than the client that submitted it.
    """

    _STOP = object()
    _MAX_BATCH = 128

    def __init__(self, path: Path, *, synchronous: str, on_events: Callable[[list[Event]], None]):
        self.path = path
        self._synchronous = synchronous
        self._on_events = on_events
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.last_error: str | None = None   # of the last call; any success clears it
        # Of the last write; only a write clears it. Reads go on working while
        # the disk is full or the file read-only, so last_error alone would
        # hide such a fault from /v1/status (whose own read clears it).
        self.write_error: str | None = None

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = self._loop.create_future()
        self._thread = threading.Thread(target=self._run, args=(ready,), name="comfymgr-db",
                                        daemon=True)
        self._thread.start()
        await ready

    async def close(self) -> None:
        if self._thread and self._thread.is_alive():
            self._queue.put(self._STOP)
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join)

    async def read(self, verb: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """`verb(storage, *args, **kwargs)` in the database thread: one of
        Storage's reads (Storage.get, ...)."""
        return await self._submit(_Call(verb, args, kwargs, False))

    async def write(self, verb: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """`verb(storage, *args, **kwargs)` in the database thread, committed
        (with the writes queued beside it) before this returns."""
        return await self._submit(_Call(verb, args, kwargs, True))

    async def _submit(self, call: _Call) -> Any:
        if self._thread is None or not self._thread.is_alive():
            raise StorageUnavailable("the database is closed")
        call.future = asyncio.get_running_loop().create_future()
        self._queue.put(call)
        return await call.future

    # -- the worker thread -----------------------------------------------------

    def _run(self, ready: asyncio.Future[None]) -> None:
        loop = self._loop
        assert loop is not None
        try:
            storage = Storage(self.path, synchronous=self._synchronous)
        except Exception as exc:  # noqa: BLE001 - reported to start()
            loop.call_soon_threadsafe(_settle, ready, False, exc)
            return
        storage.on_commit = lambda events: loop.call_soon_threadsafe(self._on_events, events)
        loop.call_soon_threadsafe(_settle, ready, True, None)
        held = None
        try:
            while True:
                item = held if held is not None else self._queue.get()
                held = None
                if item is self._STOP:
                    break
                if not item.write:
                    # Reads queued behind this one run now too, and all of them are
                    # handed back with one wake-up of the loop, not one each
                    # (bench/ab.py: GET x1.23, a fifth less CPU per request).
                    settled = [self._resolve(item.future, *self._call(item.bind(storage)), write=False)]
                    while len(settled) < self._MAX_BATCH:
                        try:
                            nxt = self._queue.get_nowait()
                        except queue.Empty:
                            break
                        if nxt is self._STOP or nxt.write:
                            held = nxt
                            break
                        settled.append(self._resolve(nxt.future, *self._call(nxt.bind(storage)),
                                                     write=False))
                    loop.call_soon_threadsafe(_settle_all, settled)
                    continue
                batch = [item]
                while len(batch) < self._MAX_BATCH:
                    try:
                        nxt = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if nxt is self._STOP or not nxt.write:
                        held = nxt
                        break
                    batch.append(nxt)
                outcomes = storage.run_batch([call.bind(storage) for call in batch])
                loop.call_soon_threadsafe(_settle_all, [
                    self._resolve(call.future, ok, value) for call, (ok, value) in zip(batch, outcomes)])
        finally:
            storage.close()

    def _call(self, fn: Callable[[], Any]) -> tuple[bool, Any]:
        try:
            return True, fn()
        except Exception as exc:  # noqa: BLE001 - handed to the caller
            return False, exc

    def _resolve(self, future: asyncio.Future[Any], ok: bool, value: Any, *,
                 write: bool = True) -> tuple[asyncio.Future[Any], bool, Any]:
        """The outcome to hand back to the caller's future (see _settle_all)."""
        if not ok and isinstance(value, sqlite3.Error):
            error = f"{type(value).__name__}: {value}"
            if error not in (self.last_error, self.write_error):  # once per outage, not per call
                _log_storage.error("database error: %s", error)
            self.last_error = error
            if write:
                self.write_error = error
            value = StorageUnavailable("the database cannot be written right now; nothing was "
                                       "changed, try again", details={"reason": str(value)})
        elif ok:
            self.last_error = None
            if write and self.write_error is not None:
                _log_storage.info("the database takes writes again")
                self.write_error = None
        return future, ok, value


def _settle_all(settled: list[tuple[asyncio.Future[Any], bool, Any]]) -> None:
    for future, ok, value in settled:
        _settle(future, ok, value)


def _settle(future: asyncio.Future[Any], ok: bool, value: Any) -> None:
    if future.done():
        return
    if ok:
        future.set_result(value)
    else:
        future.set_exception(value)


###############################################################################
# queue
###############################################################################
# What a submit, a cancel and a read mean, independent of HTTP. Jobs wait in
# SQLite (the queue *is* the jobs table); dispatchers, one per backend, sleep
# on a wake-up that every submit and every finished job rings.

_log_queue = logging.getLogger("comfymgr.queue")

def _output_record(node_id: str, item: Mapping[str, Any], kind: str = "images") -> dict[str, Any]:
    """One file a job produced, with the URL comfymgr serves it at."""
    filename, subfolder = str(item["filename"]), str(item.get("subfolder") or "")
    type_ = str(item.get("type") or "output")
    path = _output_path({"subfolder": subfolder, "filename": filename})
    url = f"/v1/comfyui/output/{path}" + ("" if type_ == "output" else f"?type={type_}")
    return {"filename": filename, "subfolder": subfolder, "type": type_, "nodeId": str(node_id),
            "kind": kind, "url": url}


class _Queue:
    def __init__(self, db: _Database, clock: Clock, backend_names: Sequence[str],
                 idempotency_ttl: float = 86400.0) -> None:
        self._db = db
        self._clock = clock
        self.idempotency_ttl = idempotency_ttl
        self.backend_names = tuple(backend_names)
        self._wakeups: list[asyncio.Event] = []
        self.on_work: Callable[[str, int], None] | None = None  # the bridge's kick, once it runs
        # The seq of the last workflow:queued event committed. Jobs become
        # claimable only with such an event, so a claim that found nothing
        # is not tried again (a round trip to the database thread) before
        # this moves.
        self.queued_seq = 0

    def now_ms(self) -> int:
        return _ms(self._clock())

    # -- dispatcher wake-ups ---------------------------------------------------

    def waiter(self) -> asyncio.Event:
        """An Event set whenever there may be work; the dispatcher clears it
        before it looks, so a wake-up between look and sleep is never lost."""
        event = asyncio.Event()
        self._wakeups.append(event)
        return event

    def notify(self, target: str = TARGET_ANY, priority: int = int(Priority.HIGH)) -> None:
        """A job for `target` with `priority` waits (new, or back in the
        queue). The bridge wakes the one dispatcher that should take it
        (on_work); without a bridge, every waiter wakes."""
        if self.on_work is not None:
            self.on_work(target, priority)
        else:
            for event in self._wakeups:
                event.set()

    def saw(self, events: Sequence[Event]) -> None:
        """Committed events, in seq order (see queued_seq)."""
        for event in events:
            if event.type == "workflow:queued":
                self.queued_seq = event.seq

    # -- verbs -----------------------------------------------------------------

    def resolve_target(self, gpu: str) -> str:
        """The submit field `gpu`: "local" or "any" -> any backend; a backend
        name -> that backend; anything else is refused with the valid values."""
        if gpu in ("local", TARGET_ANY):
            return TARGET_ANY
        if gpu in self.backend_names:
            return gpu
        valid = list(dict.fromkeys(["local", TARGET_ANY, *self.backend_names]))
        raise BadRequest(f"gpu: unknown value {gpu!r}; use one of {', '.join(valid)}",
                         code="unknown_gpu", details={"field": "gpu", "valid": valid})

    async def submit(self, workflow: Mapping[str, Any], priority: Priority, target: str, *,
                     timeout_s: float | None, extra: dict[str, Any] | None = None,
                     idempotency: tuple[str, str] | None = None, owner: str = ADMIN,
                     job_id: str | None = None) -> tuple[Job, int | None, bool]:
        """Queue a job for `owner` (the submitting key's name); with an
        (idempotency key, body hash), a retry returns the original job
        instead (replayed=True)."""
        job_id, text, now = job_id or _new_id(), _dumps(workflow), self.now_ms()
        if idempotency is None:
            job, position = await self._db.write(Storage.enqueue, job_id, text, priority, target,
                                                 now, timeout_s=timeout_s, extra=extra, owner=owner)
            replayed = False
        else:
            key, digest = idempotency
            job, position, replayed = await self._db.write(
                Storage.enqueue_once, key, digest, _ms(self.idempotency_ttl), job_id, text, priority,
                target, now, timeout_s=timeout_s, extra=extra, owner=owner)
        if replayed:
            _log_queue.info("idempotent retry of %s", job.id, extra={"job": job.id})
            return job, position, True
        _log_queue.info("queued %s priority=%s gpu=%s position=%s", job.id,
                        priority.label, target, position, extra={"job": job.id})
        self.notify(target, int(priority))
        return job, position, False

    async def get(self, job_id: str, owner: str | None = None) -> tuple[Job, int | None]:
        """The job and its queue position. With `owner` (a client key's
        name), another key's job is NotFound, exactly as an unknown id."""
        return await self._db.read(Storage.job_and_position, job_id, owner)

    async def cancel(self, job_id: str, owner: str | None = None) -> Job:
        """Queued jobs end at once; in-flight ones are marked for the bridge."""
        job = await self._db.write(Storage.request_cancel, job_id, self.now_ms(), owner)
        _log_queue.info("cancel requested for %s (%s)", job.id, job.state.value,
                        extra={"job": job.id})
        return job

    async def list(self, *, statuses: Sequence[str], priority: Priority | None,
                   before: int | None, limit: int,
                   owner: str | None = None) -> tuple[list[Job], dict[str, int]]:
        """A page of jobs, newest first, with the queue positions of the queued ones."""
        return await self._db.read(Storage.list_page, statuses=statuses, priority=priority,
                                   before=before, limit=limit, owner=owner)


INLINE_INPUTS_FOLDER = "comfymgr-jobs"  # ComfyUI input subfolder of inline inputs, one per job


class _InputStore:
    """The inline inputs of jobs (a submit's `inputs`), kept until the job
    ends. With COMFYUI_INPUTS they are written straight into ComfyUI's input
    folder, at comfymgr-jobs/<job id>/<file>; without it they wait in the state
    directory (inputs/<job id>/) and the dispatcher uploads them through
    /upload/image to the backend that takes the job, under the same name.
    Files are written and removed in worker threads, never on the loop."""

    def __init__(self, config: Config) -> None:
        self.inputs_dir = config.inputs_dir
        self.local = config.state_dir / "inputs"
        self.keep = config.keep_inputs
        self.pending: set[str] = set()   # job ids whose inputs are stored

    @staticmethod
    def subfolder(job_id: str) -> str:
        return f"{INLINE_INPUTS_FOLDER}/{job_id}"

    @property
    def uploads(self) -> bool:
        """Whether the dispatcher must upload them (no shared input folder)."""
        return self.inputs_dir is None

    def _folder(self, job_id: str) -> Path:
        if self.inputs_dir is not None:
            return self.inputs_dir / INLINE_INPUTS_FOLDER / job_id
        return self.local / job_id

    async def save(self, job_id: str, files: Sequence[tuple[str, bytes]]) -> None:
        def write() -> None:
            folder = self._folder(job_id)
            folder.mkdir(parents=True, exist_ok=True)
            for name, data in files:
                _write_file(folder / name, data)
        await asyncio.to_thread(write)
        self.pending.add(job_id)

    async def read(self, job_id: str, name: str) -> bytes:
        return await asyncio.to_thread((self._folder(job_id) / name).read_bytes)

    async def remove(self, job_id: str) -> None:
        """Remove a job's inputs (its end came, or its submit failed)."""
        self.pending.discard(job_id)
        await asyncio.to_thread(shutil.rmtree, self._folder(job_id), True)

    async def sweep(self, db: _Database) -> None:
        """At start: remember the jobs whose inputs wait; remove the inputs of
        jobs that ended (or never got queued) while comfymgr was down."""
        base = self.inputs_dir / INLINE_INPUTS_FOLDER if self.inputs_dir is not None else self.local
        names = await asyncio.to_thread(lambda: [p.name for p in base.iterdir() if p.is_dir()]
                                        if base.is_dir() else [])
        jobs = await db.read(Storage.get_many, names)
        for name in names:
            job = jobs.get(name)
            if job is not None and not job.terminal:
                self.pending.add(name)
            elif not self.keep:
                await self.remove(name)


def _write_file(path: Path, data: bytes) -> None:
    """Write a whole file durably (flushed to disk before it is used)."""
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


###############################################################################
# comfyui client
###############################################################################
# ComfyUI's HTTP API and what it says, read as untrusted input (docs/PROTOCOL.md
# has the protocol in full). Every answer and every WebSocket message is
# checked for shape before use: custom node packs broadcast messages of their
# own with any data, and servers differ. What cannot be read is reported as a
# BackendError (the call failed) or a _ProtocolError (it answered, but not in
# a shape comfymgr understands), never an exception from deep inside a task.
# The bridge section below drives the client.

_log_bridge = logging.getLogger("comfymgr.bridge")

_HISTORY_RETRIES = 5           # history written just after `executing: null`
_BACKOFF_BASE, _BACKOFF_MAX = 0.25, 10.0
_TRACEBACK_LINES = 12
_EXCERPT_CHARS = 300
_WS_MAX_MESSAGE = 32 * 1024 * 1024  # custom nodes broadcast what they like


class BackendError(ComfymgrError):
    """A call to ComfyUI failed. `sent` is False only when the request surely
    never reached ComfyUI (the connection itself failed)."""

    def __init__(self, message: str, *, sent: bool = True) -> None:
        super().__init__(message)
        self.sent = sent


class _ProtocolError(BackendError):
    """ComfyUI answered, but in a shape comfymgr cannot read."""

    def __init__(self, message: str, excerpt: str = "") -> None:
        super().__init__(message)
        self.excerpt = excerpt


_CONNECT_ERRORS: tuple[type[BaseException], ...] = (aiohttp.ClientConnectorError,) + tuple(
    t for t in (getattr(aiohttp, "ConnectionTimeoutError", None),) if t is not None)


def _connect_error(base_url: str, exc: BaseException) -> BackendError:
    """The connection to the backend failed: nothing was sent. A TLS refusal
    says why in words (aiohttp's own text buries it in a repr)."""
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        reason = getattr(exc.certificate_error, "verify_message", "") or str(exc.certificate_error)
        return BackendError(f"cannot connect to {base_url}: TLS certificate verify failed: {reason}",
                            sent=False)
    return BackendError(f"cannot connect to {base_url}: {exc}", sent=False)


def _excerpt(value: Any, limit: int = _EXCERPT_CHARS) -> str:
    """A short, printable rendering of something ComfyUI sent, for errors."""
    if isinstance(value, (bytes, bytearray)):
        text = bytes(value[:limit * 2]).decode("utf-8", "replace")
    else:
        try:
            text = _dumps(value)
        except (TypeError, ValueError):
            text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_node_id(value: Any) -> bool:
    # ComfyUI sends node ids as strings; old servers and some custom nodes as numbers.
    return isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))


class _PromptAnswer:
    """ComfyUI's answer to POST /prompt, below 500: 200 (accepted), 400
    (refused: the workflow), or another status (refused: something else)."""

    __slots__ = ("status", "body", "excerpt")

    def __init__(self, status: int, body: Any, excerpt: str) -> None:
        self.status, self.body, self.excerpt = status, body, excerpt

    @property
    def prompt_id(self) -> str | None:
        value = self.body.get("prompt_id") if isinstance(self.body, dict) else None
        return value if isinstance(value, str) and 0 < len(value) <= 128 else None


class _ComfyClient:
    """ComfyUI's HTTP API. Every call is bounded by the backend timeout, so a
    ComfyUI that accepts connections and never answers cannot hang us.

    A remote backend's headers (COMFYMGR_BACKEND_HEADERS_FILE) are the
    session's default headers, so every request, upload and the WebSocket
    handshake carries them; they are secrets, so no message built here
    quotes a request (aiohttp's repr of a response error would: it holds the
    request headers). https:// is verified against COMFYMGR_BACKEND_CA_FILE
    when set, else the system's CAs."""

    def __init__(self, base_url: str, timeout: float, *, headers: Mapping[str, str] | None = None,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.base_url = base_url
        self._timeout = aiohttp.ClientTimeout(total=timeout, sock_connect=timeout)
        self._headers = dict(headers or {})
        self._ssl = ssl_context
        self.session: aiohttp.ClientSession | None = None

    @classmethod
    def for_backend(cls, spec: BackendSpec, config: Config) -> _ComfyClient:
        return cls(spec.url, config.backend_timeout,
                   headers=config.backend_headers_file.for_backend(spec.name),
                   ssl_context=_load_ca_bundle(config.backend_ca_file) if config.backend_ca_file else None)

    async def open(self) -> None:
        connector = aiohttp.TCPConnector(ssl=self._ssl) if self._ssl is not None else None
        self.session = aiohttp.ClientSession(timeout=self._timeout, headers=self._headers,
                                             connector=connector)

    def ws_url(self, client_id: str) -> str:
        """http -> ws, https -> wss, on the backend's own host and path."""
        return "ws" + self.base_url[len("http"):] + f"/ws?clientId={client_id}"

    @contextlib.asynccontextmanager
    async def websocket(self, client_id: str, *, heartbeat: float, max_msg_size: int) -> Any:
        """ComfyUI's WebSocket as `client_id`. A refused handshake (the
        proxy's 401, a 502 while ComfyUI restarts) is a BackendError that
        names the status and the URL, without the clientId."""
        assert self.session is not None
        try:
            ws = await self.session.ws_connect(self.ws_url(client_id), heartbeat=heartbeat,
                                               autoping=True, max_msg_size=max_msg_size)
        except aiohttp.WSServerHandshakeError as exc:
            raise BackendError(f"HTTP {exc.status} from {self.base_url}/ws"
                               + (f" ({exc.message})" if exc.status < 300 else "")) from None
        except _CONNECT_ERRORS as exc:
            raise _connect_error(self.base_url, exc) from None
        try:
            yield ws
        finally:
            await ws.close()

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()

    async def _call(self, method: str, path: str, *, json_body: Any = None,
                    data: Any = None) -> tuple[int, bytes]:
        """(status, body) of one request; BackendError for a failed call or a 5xx."""
        assert self.session is not None
        try:
            async with self.session.request(method, self.base_url + path, json=json_body,
                                            data=data) as resp:
                raw = await resp.read()
                status = resp.status
        except _CONNECT_ERRORS as exc:
            raise _connect_error(self.base_url, exc) from None
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            raise BackendError(f"{method} {path}: {type(exc).__name__} {exc}".strip()) from None
        if status >= 500:
            raise BackendError(f"{method} {path}: HTTP {status}")
        return status, raw

    async def _json(self, method: str, path: str, *, json_body: Any = None) -> Any:
        """The JSON body of a 200 answer; _ProtocolError for anything else."""
        status, raw = await self._call(method, path, json_body=json_body)
        if status != 200:
            raise _ProtocolError(f"{method} {path}: HTTP {status}", _excerpt(raw))
        try:
            return _loads(raw.decode("utf-8"))
        except (ValueError, UnicodeDecodeError):
            raise _ProtocolError(f"{method} {path}: HTTP {status} with a body that is not JSON",
                                 _excerpt(raw)) from None

    async def post_prompt(self, prompt: str, prompt_id: str, client_id: str) -> _PromptAnswer:
        """POST the workflow (JSON text, sent as it was stored) under comfymgr's
        prompt id. BackendError when the outcome is unknown (no answer, 5xx)
        or surely nothing was sent (sent=False)."""
        body = '{"prompt":' + prompt + ',"prompt_id":' + _dumps(prompt_id) + \
            ',"client_id":' + _dumps(client_id) + "}"
        status, raw = await self._call("POST", "/prompt", data=aiohttp.BytesPayload(
            body.encode(), content_type="application/json"))
        try:
            parsed = _loads(raw.decode("utf-8")) if raw else None
        except (ValueError, UnicodeDecodeError):
            parsed = None
        return _PromptAnswer(status, parsed, _excerpt(raw))

    async def queue(self) -> tuple[list[str], list[str]]:
        """(running prompt ids, pending prompt ids). Items carry extra_data,
        which may hold secrets: only the ids leave this method."""
        body = await self._json("GET", "/queue")
        if not (isinstance(body, dict) and isinstance(body.get("queue_running"), list)
                and isinstance(body.get("queue_pending"), list)):
            raise _ProtocolError("GET /queue: not {queue_running: [...], queue_pending: [...]}",
                                 _excerpt(type(body).__name__))

        def items(name: str) -> list[list[Any]]:
            found = body[name]
            if not all(isinstance(i, list) and len(i) >= 2 and isinstance(i[1], str)
                       and _is_number(i[0]) for i in found):
                raise _ProtocolError(f"GET /queue: an item of {name} is not [number, prompt_id, ...]")
            return found

        running = [item[1] for item in items("queue_running")]
        pending = [item[1] for item in sorted(items("queue_pending"), key=lambda item: item[0])]
        return running, pending

    async def history(self, prompt_id: str) -> Any:
        """The history entry of a prompt (any shape: _read_history judges it),
        None when ComfyUI does not know the prompt."""
        body = await self._json("GET", f"/history/{prompt_id}")
        if not isinstance(body, dict):
            raise _ProtocolError("GET /history: not an object", _excerpt(body))
        return body.get(prompt_id)

    async def interrupt(self, prompt_id: str) -> None:
        await self._call("POST", "/interrupt", json_body={"prompt_id": prompt_id})

    async def delete_pending(self, prompt_id: str) -> None:
        await self._call("POST", "/queue", json_body={"delete": [prompt_id]})

    async def cancel_job(self, prompt_id: str) -> bool | None:
        """The newer POST /api/jobs/{id}/cancel: True/False as ComfyUI says
        whether it cancelled, None when the server has no such route."""
        status, raw = await self._call("POST", f"/api/jobs/{prompt_id}/cancel")
        if status in (404, 405):
            return None  # an older server: no such route
        try:
            body = _loads(raw.decode("utf-8"))
        except (ValueError, UnicodeDecodeError):
            raise _ProtocolError(f"POST /api/jobs/{prompt_id}/cancel: HTTP {status}, not JSON",
                                 _excerpt(raw)) from None
        return status == 200 and isinstance(body, dict) and body.get("cancelled") is True

    async def models(self, folder: str) -> list[str]:
        body = await self._json("GET", f"/models/{folder}")
        if not isinstance(body, list):
            raise _ProtocolError(f"GET /models/{folder}: not a list", _excerpt(body))
        return [str(name) for name in body if isinstance(name, (str, int, float))]

    async def upload_image(self, name: str, data: bytes, subfolder: str,
                           overwrite: bool) -> dict[str, Any]:
        # Not percent-encoded: ComfyUI would keep "cat%20%281%29.png" as the name.
        form = aiohttp.FormData(quote_fields=False)
        form.add_field("image", data, filename=name, content_type="application/octet-stream")
        form.add_field("type", "input")
        form.add_field("subfolder", subfolder)
        form.add_field("overwrite", "true" if overwrite else "false")
        status, raw = await self._call("POST", "/upload/image", data=form)
        try:
            body = _loads(raw.decode("utf-8")) if status == 200 else None
        except (ValueError, UnicodeDecodeError):
            body = None
        if not isinstance(body, dict) or not isinstance(body.get("name"), str) or not body["name"]:
            raise _ProtocolError(f"POST /upload/image: HTTP {status}", _excerpt(raw))
        return body

    @contextlib.asynccontextmanager
    async def view(self, filename: str, subfolder: str, type_: str, *, method: str = "GET",
                   headers: Mapping[str, str] | None = None) -> Any:
        """ComfyUI's GET /view of one file, as a response to stream from. The
        backend timeout bounds connecting and each read, not the whole body."""
        assert self.session is not None
        query = urllib.parse.urlencode({"filename": filename, "subfolder": subfolder, "type": type_})
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self._timeout.total,
                                        sock_read=self._timeout.total)
        try:
            resp = await self.session.request(method, f"{self.base_url}/view?{query}",
                                              headers=headers, timeout=timeout)
        except _CONNECT_ERRORS as exc:
            raise BackendError(f"cannot connect to {self.base_url}: {exc}", sent=False) from None
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            raise BackendError(f"{method} /view: {type(exc).__name__} {exc}".strip()) from None
        try:
            yield resp
        finally:
            resp.release()

    async def system_stats(self) -> Any:
        return await self._json("GET", "/system_stats")

    async def object_info(self) -> Any:
        return await self._json("GET", "/object_info")


###############################################################################
# comfyui protocol
###############################################################################
# Reading what ComfyUI says: answers of /system_stats, /object_info and
# /history, and WebSocket messages, each checked for shape before use (custom
# node packs send anything); and the workflow checks comfymgr can make at
# submit from /object_info alone.

def _read_system_stats(body: Any) -> tuple[str | None, list[dict[str, Any]]]:
    """(ComfyUI version, devices) from /system_stats; _ProtocolError when it
    is not the expected shape. argv is never read (it may hold secrets)."""
    if not isinstance(body, dict) or not isinstance(body.get("system", {}), dict) \
            or not isinstance(body.get("devices", []), list):
        raise _ProtocolError("GET /system_stats: not {system: {...}, devices: [...]}",
                             _excerpt(type(body).__name__))
    version = (body.get("system") or {}).get("comfyui_version")
    devices = []
    for device in body.get("devices") or []:
        if isinstance(device, dict):
            devices.append({
                "name": str(device["name"])[:200] if isinstance(device.get("name"), str) else None,
                "type": str(device["type"])[:50] if isinstance(device.get("type"), str) else None,
                "index": device.get("index") if _is_number(device.get("index")) else None,
                "vram_total": device.get("vram_total") if _is_number(device.get("vram_total")) else None,
                "vram_free": device.get("vram_free") if _is_number(device.get("vram_free")) else None,
            })
    return (str(version)[:64] if isinstance(version, (str, int, float)) else None), devices


def _read_object_info(body: Any) -> tuple[dict[str, Any], frozenset[str]]:
    """The node classes of /object_info whose schema comfymgr can use for its
    submit-time checks, and the names of those it could not read."""
    if not isinstance(body, dict):
        raise _ProtocolError("GET /object_info: not an object", _excerpt(type(body).__name__))
    kept: dict[str, Any] = {}
    for name, info in body.items():
        # What every ComfyUI writes for every node class; a custom node whose
        # entry lacks it is checked by ComfyUI itself at dispatch.
        if not (isinstance(info, dict) and isinstance(info.get("input"), dict)
                and isinstance(info.get("output"), list) and isinstance(info.get("output_node"), bool)
                and isinstance(info.get("name"), str)):
            continue
        inputs = info["input"]
        if not all(isinstance(inputs.get(group, {}), dict) for group in ("required", "optional")):
            continue
        kept[name] = {"input": {"required": inputs.get("required") or {},
                                "optional": inputs.get("optional") or {}},
                      "output": info["output"], "output_node": info["output_node"]}
    if body and not kept:  # e.g. a proxy's JSON error page: nothing here is a node schema
        raise _ProtocolError("GET /object_info: no entry is a node schema", _excerpt(body))
    return kept, frozenset(str(name) for name in body if name not in kept)


class _HistoryRecord:
    """What a prompt's /history entry says: how it ended, its files, and the
    end message (execution_error / execution_interrupted data) if any."""

    __slots__ = ("outcome", "outputs", "message")

    def __init__(self, outcome: str, outputs: list[dict[str, Any]],
                 message: dict[str, Any] | None = None) -> None:
        self.outcome, self.outputs, self.message = outcome, outputs, message


def _read_history(entry: Any) -> _HistoryRecord:
    """Judge a history entry; _ProtocolError with an excerpt when it cannot
    be read (the job then fails backend_protocol_error rather than wait)."""
    problem = None
    if not isinstance(entry, dict):
        problem = "the entry is not an object"
    elif not isinstance(entry.get("status"), dict):
        problem = "the entry has no status object"
    elif not isinstance(entry.get("outputs", {}), dict):
        problem = "its outputs are not an object"
    elif not isinstance(entry["status"].get("messages", []), list):
        problem = "its status messages are not a list"
    if problem:
        raise _ProtocolError(problem, _excerpt(entry))
    status = entry["status"]
    outputs = _history_outputs(entry)
    if status.get("status_str") == "success" and status.get("completed") is True:
        return _HistoryRecord("success", outputs)
    for name in ("execution_interrupted", "execution_error"):
        data = _history_event(entry, name)
        if data is not None:
            return _HistoryRecord(name, outputs, data)
    if status.get("completed") is False or status.get("status_str") == "error":
        return _HistoryRecord("error", outputs)
    raise _ProtocolError("its status is neither success nor error", _excerpt(entry))


def _history_outputs(entry: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The files of a history entry: every list item with a filename, of any
    kind (images, gifs, audio, ...), in node order. Other items (texts of
    custom nodes) are not files."""
    records = []
    for node_id, produced in (entry.get("outputs") or {}).items():
        if not isinstance(produced, dict):
            continue
        for kind, items in produced.items():
            if not isinstance(items, list):
                continue
            for item in items:
                if (isinstance(item, dict) and isinstance(item.get("filename"), str)
                        and item["filename"] and isinstance(item.get("subfolder", ""), str)
                        and isinstance(item.get("type", "output"), str)):
                    records.append(_output_record(node_id, item, str(kind)))
    return records


def _history_event(entry: Mapping[str, Any], name: str) -> dict[str, Any] | None:
    for message in (entry.get("status") or {}).get("messages") or []:
        if isinstance(message, list) and len(message) == 2 and message[0] == name:
            return message[1] if isinstance(message[1], dict) else {}
    return None


def _text_field(data: Mapping[str, Any], name: str, limit: int = 2000) -> str | None:
    value = data.get(name)
    if value is None:
        return None
    text = value if isinstance(value, str) else _excerpt(value, limit)
    return text[:limit]


def _execution_error(data: Mapping[str, Any]) -> dict[str, Any]:
    traceback = data.get("traceback") or []
    if isinstance(traceback, str):
        traceback = traceback.splitlines()
    elif not isinstance(traceback, list):
        traceback = [_excerpt(traceback)]
    exception_type = _text_field(data, "exception_type", 200)
    exception_message = _text_field(data, "exception_message")
    node_id = data.get("node_id")
    return {
        "code": "execution_error",
        "message": f"{exception_type or 'error'}: {(exception_message or '').strip()}",
        "nodeId": str(node_id) if _is_node_id(node_id) else None,
        "nodeType": _text_field(data, "node_type", 200),
        "exceptionType": exception_type,
        "exceptionMessage": exception_message,
        "traceback": [str(line)[:500] for line in traceback[-_TRACEBACK_LINES:]],
    }


def _protocol_error(what: str, exc: _ProtocolError) -> dict[str, Any]:
    """A job's `error` when ComfyUI's record of it cannot be read."""
    error = {"code": "backend_protocol_error", "message": f"{what}: {exc}"}
    if exc.excerpt:
        error["excerpt"] = exc.excerpt
    return error


# What each known WebSocket message type must carry: name -> (type check,
# required). Types not listed here are custom nodes' own and are ignored.
_FIELD_CHECKS: dict[str, Callable[[Any], bool]] = {
    "str": lambda v: isinstance(v, str),
    "node": _is_node_id,
    "node?": lambda v: v is None or _is_node_id(v),
    "number": _is_number,
    "list": lambda v: isinstance(v, list),
    "dict": lambda v: isinstance(v, dict),
}
_MESSAGE_SHAPES: dict[str, dict[str, tuple[str, bool]]] = {
    "status": {"status": ("dict", False), "sid": ("str", False)},
    "execution_start": {"prompt_id": ("str", True)},
    "execution_cached": {"prompt_id": ("str", True), "nodes": ("list", True)},
    # The "executing" a reconnecting socket gets carries no prompt_id.
    "executing": {"prompt_id": ("str", False), "node": ("node?", True)},
    "executed": {"prompt_id": ("str", True), "node": ("node", True)},
    # Custom nodes send progress of their own, without prompt_id or node.
    "progress": {"prompt_id": ("str", False), "node": ("node?", False),
                 "value": ("number", True), "max": ("number", True)},
    "progress_state": {"prompt_id": ("str", True), "nodes": ("dict", True)},
    "execution_success": {"prompt_id": ("str", True)},
    "execution_error": {"prompt_id": ("str", True)},
    "execution_interrupted": {"prompt_id": ("str", True)},
    "feature_flags": {},
}


def _read_message(text: str) -> tuple[str, Any, str | None]:
    """(type, data, problem) of one text frame: problem is None for a known
    type of the right shape, "unknown_type", "bad_shape" or "unreadable"."""
    try:
        message = json.loads(text)
    except (ValueError, RecursionError):
        return "", None, "unreadable"
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        return "", None, "unreadable"
    kind, data = message["type"], message.get("data")
    shape = _MESSAGE_SHAPES.get(kind)
    if shape is None:
        return kind, data, "unknown_type"
    if not isinstance(data, dict):
        return kind, data, "bad_shape"
    for name, (check, required) in shape.items():
        if name in data:
            if not _FIELD_CHECKS[check](data[name]):
                return kind, data, "bad_shape"
        elif required:
            return kind, data, "bad_shape"
    return kind, data, None


# -- workflow checks against /object_info ---------------------------------------------

def _is_link(value: Any) -> bool:
    # ComfyUI treats every list input as a link [node id, output index].
    return isinstance(value, list)


def _output_nodes(workflow: Mapping[str, Any], object_info: Mapping[str, Any]) -> list[str]:
    return [nid for nid, node in workflow.items()
            if object_info.get(node.get("class_type"), {}).get("output_node")]


def _reachable(workflow: Mapping[str, Any], roots: Iterable[str]) -> set[str]:
    seen: set[str] = set()
    stack = [str(r) for r in roots]
    while stack:
        nid = stack.pop()
        if nid in seen or nid not in workflow:
            continue
        seen.add(nid)
        for value in (workflow[nid].get("inputs") or {}).values():
            if _is_link(value) and value:
                stack.append(str(value[0]))
    return seen


_MAX_NODE_ERRORS = 20  # faulty nodes reported per refused workflow (each costs one walk)


def _node_error(type_: str, message: str, details: str, input_name: str) -> dict[str, Any]:
    return {"type": type_, "message": message, "details": details,
            "extra_info": {"input_name": input_name}}


def _check_workflow(workflow: Mapping[str, Any], object_info: Mapping[str, Any]) -> dict[str, Any] | None:
    """What ComfyUI's own validation would refuse that can be known from
    /object_info alone, in ComfyUI's error shape; None when nothing is wrong.
    Values (ranges, file names) are left to ComfyUI at dispatch.

    Linear in the graph: each node that would run is checked once, and the
    outputs that depend on a faulty node are found by one walk back from it
    (at most _MAX_NODE_ERRORS of them). Walking every output's own subgraph
    was quadratic: 3,000 outputs on one 3,000-node chain held the event
    loop for 20 s."""
    def body(type_: str, message: str, details: str = "",
             node_errors: dict[str, Any] | None = None) -> dict[str, Any]:
        return {"error": {"type": type_, "message": message, "details": details, "extra_info": {}},
                "node_errors": node_errors or {}}

    def input_errors(node: Mapping[str, Any]) -> list[dict[str, Any]]:
        schema = object_info[node["class_type"]]
        inputs = node.get("inputs") or {}
        errors = []
        for name in (schema.get("input") or {}).get("required") or {}:
            if name not in inputs:
                errors.append(_node_error("required_input_missing", "Required input is missing",
                                          name, name))
        for name, value in inputs.items():
            if not _is_link(value):
                continue
            if len(value) != 2 or not isinstance(value[1], int) or isinstance(value[1], bool):
                errors.append(_node_error(
                    "bad_linked_input",
                    "Bad linked input, must be a length-2 list of [node_id, slot_index]",
                    f"{name}, {value}", name))
                continue
            source = workflow.get(str(value[0]))
            if source is None:
                errors.append(_node_error(
                    "linked_node_missing", "Input is linked to a node that does not exist",
                    f"{name}: node '{value[0]}'", name))
                continue
            produced = object_info[source["class_type"]].get("output") or []
            if not 0 <= value[1] < len(produced):
                errors.append(_node_error(
                    "linked_output_missing",
                    "Input is linked to an output the source node does not have",
                    f"{name}: node '{value[0]}' ({source['class_type']}) has {len(produced)} "
                    f"output(s), not index {value[1]}", name))
        return errors

    for nid, node in workflow.items():
        if node["class_type"] not in object_info:
            return body("invalid_prompt",
                        f"Cannot execute because node {node['class_type']} does not exist.",
                        f"Node ID '#{nid}'")
    outputs = _output_nodes(workflow, object_info)
    if not outputs:
        return body("prompt_no_outputs", "Prompt has no outputs")
    faulty: dict[str, list[dict[str, Any]]] = {}
    for nid in sorted(_reachable(workflow, outputs)):
        errors = input_errors(workflow[nid])
        if errors:
            faulty[nid] = errors
            if len(faulty) == _MAX_NODE_ERRORS:
                break
    if not faulty:
        return None
    consumers: dict[str, list[str]] = {}
    for nid, node in workflow.items():
        for value in (node.get("inputs") or {}).values():
            if _is_link(value) and value:
                consumers.setdefault(str(value[0]), []).append(nid)
    node_errors: dict[str, Any] = {}
    for nid, errors in faulty.items():
        dependents, stack = {nid}, [nid]
        while stack:
            for consumer in consumers.get(stack.pop(), ()):
                if consumer not in dependents:
                    dependents.add(consumer)
                    stack.append(consumer)
        node_errors[nid] = {"errors": errors,
                            "dependent_outputs": [out for out in outputs if out in dependents],
                            "class_type": workflow[nid]["class_type"]}
    return body("prompt_outputs_failed_validation", "Prompt outputs failed validation",
                node_errors=node_errors)


def _invalid_workflow(body: Mapping[str, Any]) -> dict[str, Any]:
    """comfymgr's `error` for a workflow ComfyUI (or its /object_info) refuses."""
    error = body.get("error") if isinstance(body.get("error"), dict) else {}
    message = _text_field(error, "message", 500) or "ComfyUI refused the workflow"
    if error.get("details"):
        message += f": {_text_field(error, 'details', 1000)}"
    node_errors = body.get("node_errors")
    return {"code": "invalid_workflow", "message": message,
            "details": {"error": error, "node_errors": node_errors if isinstance(node_errors, dict) else {}}}


###############################################################################
# bridge
###############################################################################
# What happens to a job between its claim and its end. The rules it lives by:
# - comfymgr mints a lowercase UUID4 prompt_id for every attempt and stores
#   it (state dispatching) before POST /prompt, always with `client_id`;
# - one WebSocket per backend, a fresh clientId per connection;
# - WebSocket messages are hints; /queue and /history are the record: a job
#   is completed only when ComfyUI's history says success;
# - what a prompt became is asked of ComfyUI in one way (_Backend.locate:
#   /queue, then /history), at start, after every reconnect, on a timer, and
#   before any cancel, preemption or judgement;
# - a prompt is judged gone only after a second look: a POST whose answer
#   was lost after a grace of several backend timeouts, an acknowledged
#   prompt after two reconciles; so a slow answer never runs a prompt twice;
# - timeouts and cancels run by comfymgr's own clock, whether or not the
#   backend answers; prompts comfymgr gave up on are "abandoned" and removed
#   from ComfyUI (deleted or interrupted) when it is seen again.
# Each backend is one _Backend: it alone changes its connection, its runs and
# its jobs' rows, in its three supervised tasks (WebSocket, dispatcher,
# tick). _Bridge holds the backends and what spans them.

_UNKNOWN_POST_GRACE = 3  # backend timeouts before an unanswered POST is judged lost
_IDLE_LOOK = 1.0  # seconds between a free dispatcher's own looks at the queue
_ABANDONED_MAX, _ABANDONED_TTL = 1000, 3600.0


_PREVIEW_MAX_BYTES = 4 * 1024 * 1024  # a 512 px preview is tens of KB; more is not a preview
_PREVIEW_INTERVAL = 0.5  # at most 2 workflow:preview messages per second per job
_PREVIEW_TYPES = {1: "image/jpeg", 2: "image/png"}
_PREVIEW_SIGNATURES = {"image/jpeg": b"\xff\xd8\xff", "image/png": b"\x89PNG\r\n\x1a\n"}
_BINARY_PREVIEW, _BINARY_TEXT, _BINARY_PREVIEW_WITH_METADATA = 1, 3, 4


@dataclasses.dataclass(frozen=True)
class _Preview:
    image: bytes
    content_type: str
    node_id: str | None
    counter: int


def _read_binary_frame(frame: bytes) -> tuple[int, str, bytes, dict[str, Any]] | None:
    """(event type, content type, image, metadata) of a preview frame; None
    for a frame that is not a readable preview. ComfyUI (server.py): a
    big-endian u32 event type, then for 1 a u32 image type (1 JPEG, 2 PNG)
    and the image, for 4 a u32 metadata length, that JSON and the image."""
    if len(frame) < 8:
        return None
    event = int.from_bytes(frame[:4], "big")
    if event == _BINARY_PREVIEW:
        content_type = _PREVIEW_TYPES.get(int.from_bytes(frame[4:8], "big"))
        image, metadata = frame[8:], {}
    elif event == _BINARY_PREVIEW_WITH_METADATA:
        length = int.from_bytes(frame[4:8], "big")
        if length > len(frame) - 8 or length > 64 * 1024:
            return None
        try:
            metadata = json.loads(frame[8:8 + length].decode("utf-8"))
        except (ValueError, UnicodeDecodeError, RecursionError):
            return None
        if not isinstance(metadata, dict):
            return None
        content_type = metadata.get("image_type") if metadata.get("image_type") in _PREVIEW_SIGNATURES \
            else None
        image = frame[8 + length:]
    else:
        return (event, "", b"", {})
    if content_type is None or not image.startswith(_PREVIEW_SIGNATURES[content_type]) \
            or len(image) > _PREVIEW_MAX_BYTES:
        return None
    return event, content_type, image, metadata


@dataclasses.dataclass(eq=False)
class _Run:
    """What comfymgr knows of one in-flight prompt, beside the job's row."""

    job_id: str
    prompt_id: str
    priority: int
    nodes: frozenset[str]            # what ComfyUI will execute (reachable from outputs)
    timeout_s: float | None
    pinned: bool = False             # submitted for this backend only
    owner: str = ADMIN               # the key name that submitted the job
    started: float | None = None     # clock() at execution_start
    posting: bool = False            # POST /prompt under way: nobody judges it meanwhile
    acknowledged: bool = False       # ComfyUI has it (POST answered, or seen in its queue)
    post_unknown_since: float | None = None  # POST unanswered (timeout, 5xx) since
    missing_since: float | None = None        # found in neither /queue nor /history since
    cached: set[str] = dataclasses.field(default_factory=set)
    node_progress: dict[str, float] = dataclasses.field(default_factory=dict)
    current_node: str | None = None
    progress: float = 0.0
    dirty: bool = False
    last_flush: float = float("-inf")
    ending: tuple[str, dict[str, Any]] | None = None  # the end message, a hint
    interrupt: str | None = None     # "cancel" or "timeout" once decided
    interrupt_sent: bool = False     # ComfyUI has been asked to stop it
    give_up_at: float | None = None  # clock(): recorded ended by comfymgr if not confirmed by then
    preview: _Preview | None = None  # the latest preview image; dropped with the run
    preview_announced: float = float("-inf")  # loop time of the last workflow:preview
    preview_pending: bool = False    # a workflow:preview is scheduled
    # The nodes' finished fractions summed (a cached node counts 1), kept up
    # to date by set_node/add_cached: summing all nodes on every message made
    # a 10,000-node run cost 10,000 x 20,000 steps of the event loop.
    done: float = 0.0

    def _share(self, node: str) -> float:
        if node not in self.nodes:
            return 0.0
        return 1.0 if node in self.cached else self.node_progress.get(node, 0.0)

    def set_node(self, node: str, fraction: float) -> None:
        before = self._share(node)
        self.node_progress[node] = fraction
        self.done += self._share(node) - before

    def add_cached(self, nodes: Iterable[str]) -> None:
        for node in nodes:
            before = self._share(node)
            self.cached.add(node)
            self.done += self._share(node) - before

    def recompute(self) -> None:
        if not self.nodes:
            return
        value = round(min(100.0, 100.0 * self.done / len(self.nodes)), 1)
        if value > self.progress:
            self.progress, self.dirty = value, True


class _OwnedLock(asyncio.Lock):
    """An asyncio.Lock that knows which task holds it, so that "caller holds
    the lock" is checked, not only written in a docstring."""

    _owner: asyncio.Task[Any] | None = None

    async def acquire(self) -> bool:
        await super().acquire()
        self._owner = asyncio.current_task()
        return True

    def release(self) -> None:
        self._owner = None
        super().release()

    def assert_held(self) -> None:
        if self._owner is None or self._owner is not asyncio.current_task():
            raise RuntimeError("this needs the backend's lock, held by the calling task")


class _Located:
    """Where a prompt is on ComfyUI: running, pending, finished (with its
    history entry) or missing (in neither /queue nor /history)."""

    __slots__ = ("where", "entry")

    def __init__(self, where: str, entry: Any = None) -> None:
        self.where, self.entry = where, entry


class _BackendState:
    """One ComfyUI server: its connection, its runs (one at a time, plus one
    waiting in ComfyUI's queue with prefetch), its state.

    Locking: `lock` is held by whatever changes this backend's runs and their
    rows with awaits in between: dispatch, preemption, reconcile, a run's
    end, interrupts and deadlines. Methods whose names end in `_locked`, and
    those that say so, need it (checked: _OwnedLock.assert_held). Progress
    messages only touch their run object and take no lock.
    """

    def __init__(self, spec: BackendSpec, *, config: Config, db: _Database, queue_: _Queue,
                 clock: Clock, metrics: _Metrics, inputs: _InputStore) -> None:
        self.spec = spec
        self.inputs = inputs
        self.name = spec.name
        self.config = config
        self.db = db
        self.queue = queue_
        self.clock = clock
        self.metrics = metrics
        self.client = _ComfyClient.for_backend(spec, config)
        self.up = False
        self.incompatible: str | None = None   # why this server gets no jobs
        self.down_since: float | None = clock()
        self.last_error: str | None = None
        self.version: str | None = None
        self.devices: list[dict[str, Any]] = []
        self.object_info: dict[str, Any] | None = None
        # Classes /object_info lists without a schema comfymgr can read.
        self.unreadable_classes: frozenset[str] = frozenset()
        self.queue_remaining: int | None = None
        self.client_id: str | None = None
        self.runs: dict[str, _Run] = {}        # job id -> run
        self.abandoned: dict[str, float] = {}  # prompt ids comfymgr gave up on -> since (clock)
        self.jobs_cancel_route: bool | None = None
        self.lock = _OwnedLock()
        self.wake = queue_.waiter()
        # (queue.queued_seq, pinned_only) of the last claim that found nothing.
        self.found_nothing: tuple[int, bool] | None = None
        self.last_reconcile = float("-inf")
        self._reconcile_requested = False
        self._dispatch_failures = 0
        self._dispatch_not_before = 0.0        # loop time; dispatch backs off after failures
        self.last_dispatch = 0.0               # loop time of the last claim: spreads the load
        self.pass_on: Callable[[], None] = lambda: None
        self.idle_elsewhere: Callable[[], bool] = lambda: False
        self._warned: set[str] = set()
        # Called with a run whose preview changed, at most every _PREVIEW_INTERVAL.
        self.on_preview: Callable[[_Run], None] = lambda run: None

    # -- status --------------------------------------------------------------

    @property
    def state(self) -> str:
        if self.incompatible:
            return "incompatible"
        return "up" if self.up else "down"

    def view(self) -> dict[str, Any]:
        return {
            "name": self.name, "url": self.spec.url, "gpu": self.spec.gpu_index,
            "state": self.state, "lastError": self.last_error,
            "downSince": _ms(self.down_since) if self.down_since is not None and not self.up else None,
            "comfyuiVersion": self.version,
            "devices": self.devices,
            "runningJob": next((r.job_id for r in self.runs.values() if r.started), None),
            "waitingJob": next((r.job_id for r in self.runs.values() if not r.started), None),
            "comfyuiQueueRemaining": self.queue_remaining,
        }

    def error(self, message: str) -> None:
        """Record (and log once) what is wrong with this backend now."""
        if message != self.last_error:
            _log_bridge.warning("backend %s: %s", self.name, message, extra={"backend": self.name})
        self.last_error = message

    def request_reconcile(self) -> None:
        """Ask ComfyUI about every in-flight prompt at the next tick."""
        self._reconcile_requested = True

    def _warn_once(self, key: str, message: str, *args: Any) -> None:
        if key not in self._warned:
            self._warned.add(key)
            _log_bridge.warning("backend %s: " + message, self.name, *args,
                                extra={"backend": self.name})

    def now_ms(self) -> int:
        return _ms(self.clock())


###############################################################################
# bridge: settling runs
###############################################################################
# What becomes of a run: deadlines by comfymgr's clock (the tick task),
# asking ComfyUI where a prompt is (locate, reconcile), the end recorded
# from /history, cancels and timeouts, prompts given up on. Everything
# here that changes a run takes the backend's lock.


class _BackendRuns(_BackendState):
    """A backend's runs, settled."""

    # -- the tick task ---------------------------------------------------------------

    async def tick_loop(self) -> None:
        period = max(0.05, min(1.0, self.config.reconcile_interval,
                               self.config.progress_interval or 1.0))
        while True:
            await asyncio.sleep(period)
            try:
                await self.tick()
            except ApiError as exc:  # storage unavailable: said once, not a traceback a tick
                self.error(f"cannot record what ComfyUI said: {exc.message}")

    async def tick(self) -> None:
        """Late progress, deadlines (timeouts, cancels, a backend gone too
        long), and the periodic reconcile."""
        now = self.clock()
        for run in list(self.runs.values()):
            if run.dirty:
                await self._flush_progress(run)
        async with self.lock:
            for run in list(self.runs.values()):
                if run.job_id in self.runs:
                    await self._deadlines_locked(run, now)
            if (not self.up and self.down_since is not None
                    and now - self.down_since >= self.config.backend_lost_after):
                for run in [r for r in self.runs.values() if r.started is not None]:
                    _log_bridge.warning("%s: backend %s down for %.0f s", run.job_id, self.name,
                                        now - self.down_since, extra={"job": run.job_id})
                    await self._lost_locked(run, f"ComfyUI {self.name} has been unreachable for "
                                                 f"{now - self.down_since:.0f} s")
            if self.up and (self._reconcile_requested or (self.runs or self.abandoned) and
                            now - self.last_reconcile >= self.config.reconcile_interval):
                try:
                    await self._reconcile_locked()
                except BackendError as exc:
                    self.error(f"reconcile: {exc}")
                except ApiError:
                    self.request_reconcile()  # the database's error is logged there; next tick

    async def _deadlines_locked(self, run: _Run, now: float) -> None:
        self.lock.assert_held()
        if (run.interrupt is None and run.timeout_s and run.started is not None
                and now - run.started > run.timeout_s):
            _log_bridge.info("%s: over its %g s timeout", run.job_id, run.timeout_s,
                             extra={"job": run.job_id})
            await self.db.write(Storage.note_attempt, run.job_id, run.prompt_id, self.now_ms(),
                                interrupt="timeout")
            run.interrupt, run.give_up_at = "timeout", now + self.config.cancel_grace
            if self.up and not run.posting:
                await self._interrupt_locked(run, "timeout")
        elif run.give_up_at is not None and now >= run.give_up_at:
            await self._give_up_locked(run)
        elif run.interrupt and not run.interrupt_sent and self.up and not run.posting:
            await self._interrupt_locked(run, run.interrupt)

    # -- locating and reconciling ---------------------------------------------------------

    async def locate(self, prompt_id: str) -> _Located:
        """Where a prompt is: /queue first, then /history for what it lacks.
        ComfyUI moves a prompt from its queue to its history atomically, so
        nothing falls between the two reads."""
        running, pending = await self.client.queue()
        return await self._locate_in(prompt_id, running, pending)

    async def _locate_in(self, prompt_id: str, running: Sequence[str],
                         pending: Sequence[str]) -> _Located:
        if prompt_id in running:
            return _Located("running")
        if prompt_id in pending:
            return _Located("pending")
        entry = await self.client.history(prompt_id)
        return _Located("missing") if entry is None else _Located("finished", entry)

    async def reconcile(self) -> None:
        """Ask ComfyUI what became of every in-flight job of this backend."""
        async with self.lock:
            await self._reconcile_locked()

    async def _reconcile_locked(self) -> None:
        self.lock.assert_held()
        self._reconcile_requested = False
        self.last_reconcile = self.clock()
        jobs = await self.db.read(Storage.in_flight, self.name)
        running, pending = await self.client.queue()
        await self._clean_abandoned_locked(running, pending)
        for job in jobs:
            run = self._attach(job)
            if run.posting or run.job_id not in self.runs:
                continue
            located = await self._locate_in(run.prompt_id, running, pending)
            if located.where != "missing":
                run.missing_since = None
            if located.where in ("running", "pending"):
                run.acknowledged = True
            if located.where == "running":
                run.post_unknown_since = None
                if job.state is not JobState.RUNNING:
                    await self._mark_running(run)
                run.started = run.started or self.clock()
            elif located.where == "pending":
                run.post_unknown_since = None
                if job.state is JobState.DISPATCHING:
                    await self.db.write(Storage.mark_submitted, run.job_id, run.prompt_id, self.now_ms())
            elif located.where == "finished":
                await self._finish_locked(run, located.entry)
                continue
            else:
                await self._missing_locked(run, job)
                continue
            if run.interrupt and not run.interrupt_sent:
                await self._interrupt_locked(run, run.interrupt)

    async def _missing_locked(self, run: _Run, job: Job) -> None:
        """A prompt in neither /queue nor /history: judged on a second look."""
        self.lock.assert_held()
        now = self.clock()
        first = run.missing_since is None
        run.missing_since = run.missing_since or now
        if run.interrupt == "cancel" and run.interrupt_sent:
            # comfymgr removed it from ComfyUI's queue itself.
            await self._stopped_locked(run, detail=" before it started")
            return
        if job.state is JobState.DISPATCHING:
            # POST /prompt's answer was lost, or comfymgr stopped before it
            # came: ComfyUI may still be validating it. Only after a grace of
            # several backend timeouts is it judged never received.
            since = run.post_unknown_since if run.post_unknown_since is not None else run.missing_since
            if now - since < _UNKNOWN_POST_GRACE * self.config.backend_timeout:
                return
            _log_bridge.info("%s: ComfyUI never received prompt %s; queued again",
                             job.id, run.prompt_id, extra={"job": job.id})
            self.abandon(run.prompt_id)
            if run.post_unknown_since is not None:  # a POST that failed counts against the job
                await self._requeue_locked(
                    run, reason="dispatch_failed", count="dispatchFailures",
                    allowed=self.config.dispatch_attempts - 1, error={
                        "code": "dispatch_failed",
                        "message": f"ComfyUI {self.name} did not take the prompt in "
                                   f"{self.config.dispatch_attempts} attempts (no answer, or "
                                   "an error, and the prompt never appeared in its queue)"})
            else:
                await self._requeue_locked(run)
            return
        if first or now - run.missing_since < self.config.reconcile_interval:
            return  # a second reconcile confirms it
        if job.extra.get("attempt", {}).get("preempting") == job.prompt_id:
            # preempt_if_overtaken removed it from ComfyUI's queue and was cut
            # short before it could say so: it never started; it waits again.
            _log_bridge.info("%s: taken back from ComfyUI's queue (preempted); queued again",
                             job.id, extra={"job": job.id})
            await self._requeue_locked(run, reason="preempted")
            return
        await self._lost_locked(run, f"ComfyUI {self.name} lost the job (it restarted while the "
                                     "job was queued or running there)")

    async def _lost_locked(self, run: _Run, message: str) -> None:
        """ComfyUI no longer has a prompt it had accepted (it restarted), or
        has been unreachable too long: the job ends, or waits again while
        COMFYMGR_BACKEND_RETRIES allows (on any backend)."""
        self.lock.assert_held()
        self.abandon(run.prompt_id)
        if run.interrupt is not None:  # it was being stopped anyway
            await self._stopped_locked(run)
            return
        _log_bridge.warning("%s: %s (prompt %s)", run.job_id, message, run.prompt_id,
                            extra={"job": run.job_id})
        await self._requeue_locked(run, reason="backend_lost", count="lost",
                                   allowed=self.config.backend_retries,
                                   error={"code": "backend_lost", "message": message})

    def abandon(self, prompt_id: str) -> None:
        """comfymgr gave up on this prompt: if ComfyUI still has it, it is
        deleted or interrupted at the next reconcile."""
        self.abandoned[prompt_id] = self.clock()
        if len(self.abandoned) > _ABANDONED_MAX:
            del self.abandoned[next(iter(self.abandoned))]

    async def _clean_abandoned_locked(self, running: Sequence[str], pending: Sequence[str]) -> None:
        now = self.clock()
        for pid, since in list(self.abandoned.items()):
            if pid in pending:
                _log_bridge.info("backend %s: removing abandoned prompt %s from ComfyUI's queue",
                                 self.name, pid, extra={"backend": self.name})
                await self.client.delete_pending(pid)
            elif pid in running:
                _log_bridge.info("backend %s: interrupting abandoned prompt %s", self.name, pid,
                                 extra={"backend": self.name})
                await self.client.interrupt(pid)
            elif now - since > max(_UNKNOWN_POST_GRACE * self.config.backend_timeout,
                                   self.config.reconcile_interval) or now - since > _ABANDONED_TTL:
                del self.abandoned[pid]  # long enough gone: it will not come back

    async def release_unstarted(self) -> None:
        """The backend is unreachable: jobs handed to it that have not started
        go back to the shared queue, in their place (unless pinned to it);
        their prompts are abandoned, in case ComfyUI still holds them."""
        async with self.lock:
            for run in list(self.runs.values()):
                if run.started is None and not run.posting and not run.pinned:
                    self.abandon(run.prompt_id)
                    _log_bridge.info("%s: backend %s is down; queued again", run.job_id,
                                     self.name, extra={"job": run.job_id})
                    await self._requeue_locked(run, reason="backend_down")

    # -- a run's life ----------------------------------------------------------------

    def _attach(self, job: Job) -> _Run:
        """The run of an in-flight job, made from its row when comfymgr has
        none (at start, or after a dispatch)."""
        run = self.runs.get(job.id)
        if run is not None and run.prompt_id == job.prompt_id:
            return run
        try:
            workflow = json.loads(job.workflow)
        except ValueError:
            workflow = {}
        nodes: Iterable[str] = workflow
        if self.object_info and isinstance(workflow, dict):
            outputs = _output_nodes(workflow, self.object_info)
            if outputs:
                nodes = _reachable(workflow, outputs)
        run = _Run(job_id=job.id, prompt_id=job.prompt_id or "", priority=int(job.priority),
                   nodes=frozenset(map(str, nodes)), timeout_s=job.timeout_s,
                   pinned=job.target != TARGET_ANY, owner=job.submitted_by, progress=job.progress)
        if job.started_at is not None:
            run.started = job.started_at / 1000
        run.acknowledged = job.state in (JobState.SUBMITTED, JobState.RUNNING)
        attempt = job.extra.get("attempt", {})
        if job.cancel_requested_at is not None:
            run.interrupt = "cancel"
            run.give_up_at = job.cancel_requested_at / 1000 + self.config.cancel_grace
        elif attempt.get("interrupt") == "timeout" and run.started is not None and run.timeout_s:
            run.interrupt = "timeout"
            run.give_up_at = run.started + run.timeout_s + self.config.cancel_grace
        self.runs[job.id] = run
        return run

    async def _mark_running(self, run: _Run) -> None:
        now = self.now_ms()
        job = await self.db.write(Storage.mark_running, run.job_id, run.prompt_id, now, self.name)
        if job is not None:
            run.started = now / 1000
            _log_bridge.info("%s running on %s", run.job_id, self.name, extra={"job": run.job_id})
            self.wake.set()  # the next job may now wait in ComfyUI's queue (prefetch)

    async def _flush_progress(self, run: _Run) -> None:
        """Progress is kept on the run and written at most once per
        progress_interval (the tick writes what is left)."""
        now = self.clock()
        if not run.dirty or now - run.last_flush < self.config.progress_interval:
            return
        run.dirty, run.last_flush = False, now
        progress, node, ms = run.progress, run.current_node, self.now_ms()
        await self.db.write(Storage.set_progress, run.job_id, progress, node, ms, emit=True)

    async def _end_locked(self, run: _Run, to: JobState, *, error: dict[str, Any] | None = None,
                          outputs: list[dict[str, Any]] | None = None) -> None:
        """Record a run's end (with the last progress first) and free the backend."""
        self.lock.assert_held()
        progress = (run.progress, run.current_node) if run.dirty else None
        try:
            job = await self.db.write(Storage.end_run, run.job_id, run.prompt_id, to, self.now_ms(),
                                      backend=self.name, outputs=outputs, error=error,
                                      progress=progress)
        except ApiError:
            # Not written: the row still says in flight. Reconcile settles it
            # again once the database takes writes (it is followed no more).
            self.request_reconcile()
            raise
        finally:
            run.dirty = False
            self.runs.pop(run.job_id, None)
            self.wake.set()
        if job is not None:
            _log_bridge.info("%s %s on %s%s", job.id, to.value, self.name,
                             f" ({error['code']})" if error else "", extra={"job": job.id})

    async def _requeue_locked(self, run: _Run, **how: Any) -> None:
        """The attempt is over without a result (see Storage.requeue_run)."""
        self.lock.assert_held()
        try:
            await self.db.write(Storage.requeue_run, run.job_id, run.prompt_id, self.now_ms(), **how)
        except ApiError:
            self.request_reconcile()  # as in _end_locked
            raise
        finally:
            self.runs.pop(run.job_id, None)
            self.queue.notify(self.name if run.pinned else TARGET_ANY, run.priority)
            self.wake.set()  # its own place is free again too

    async def _finish_locked(self, run: _Run, entry: Any = None) -> None:
        """Decide a run's end from ComfyUI's history (the record); the end
        message only stands in for it when the history cannot be fetched and
        the end was an error or an interrupt."""
        self.lock.assert_held()
        if self.runs.get(run.job_id) is not run:
            return
        if entry is None:
            for attempt in range(_HISTORY_RETRIES):
                try:
                    entry = await self.client.history(run.prompt_id)
                except BackendError as exc:
                    self.error(str(exc))
                    break
                if entry is not None:
                    break
                await asyncio.sleep(0.02 * (attempt + 1))
        if entry is None:
            if run.ending and run.ending[0] != "execution_success":
                await self._end_with_locked(run, run.ending[0], run.ending[1], [])
            else:
                self.request_reconcile()
            return
        try:
            record = _read_history(entry)
        except _ProtocolError as exc:
            self.error(f"the /history entry of prompt {run.prompt_id} cannot be read: {exc}")
            await self._end_locked(run, JobState.FAILED, error=_protocol_error(
                f"ComfyUI's /history entry for prompt {run.prompt_id} cannot be read", exc))
            return
        if record.outcome == "success":
            await self._end_locked(run, JobState.COMPLETED, outputs=record.outputs)
        elif record.message is not None:
            await self._end_with_locked(run, record.outcome, record.message, record.outputs)
        else:
            await self._end_locked(run, JobState.FAILED, error={
                "code": "execution_error", "message": "ComfyUI recorded the run as failed"})

    async def _stopped_locked(self, run: _Run, *, detail: str = "",
                              where: Mapping[str, Any] | None = None) -> None:
        """End a run that was stopped: cancelled or timed out when comfymgr
        stopped it, else interrupted by someone else on ComfyUI."""
        where = where or {}
        if run.interrupt == "cancel":
            await self._end_locked(run, JobState.CANCELLED, error=_cancelled(detail, **where))
        elif run.interrupt == "timeout":
            await self._end_locked(run, JobState.FAILED, error={
                "code": "timeout", "message": f"ran longer than its {run.timeout_s or 0:g} s timeout"
                f"{detail}", **where})
        else:
            await self._end_locked(run, JobState.FAILED, error={
                "code": "interrupted", "message": "interrupted on ComfyUI, not by comfymgr", **where})

    async def _end_with_locked(self, run: _Run, name: str, data: dict[str, Any],
                               outputs: list[dict[str, Any]]) -> None:
        if name == "execution_error":
            await self._end_locked(run, JobState.FAILED, error=_execution_error(data))
        elif name == "execution_interrupted":
            node_id = data.get("node_id")
            await self._stopped_locked(run, where={
                "nodeId": str(node_id) if _is_node_id(node_id) else None,
                "nodeType": _text_field(data, "node_type", 200)})
        else:
            await self._end_locked(run, JobState.COMPLETED, outputs=outputs)

    # -- cancel and timeout ------------------------------------------------------------

    async def request_cancel(self, job: Job) -> None:
        """The API marked an in-flight job cancelled: interrupt it now if this
        backend is reachable; the tick retries, and after COMFYMGR_CANCEL_GRACE
        records it cancelled whatever ComfyUI says."""
        async with self.lock:
            run = self.runs.get(job.id)
            if run is None:
                # Not followed here yet (comfymgr just started): follow it if,
                # now that the lock is held, the row still says it is in
                # flight here with the same prompt. The snapshot taken before
                # the lock may be stale: a dispatch that held the lock may
                # have ended or requeued it meanwhile.
                now = await self.db.read(Storage.get, job.id)
                if now is None or now.state not in _IN_FLIGHT or now.backend != self.name \
                        or now.prompt_id != job.prompt_id:
                    return
                run = self._attach(now)
            if run.interrupt != "cancel":
                run.interrupt, run.interrupt_sent = "cancel", False
                run.give_up_at = self.clock() + self.config.cancel_grace
            if run.posting or not self.up:
                return  # dispatch_next, the tick or reconcile act on the mark
            await self._interrupt_locked(run, "cancel")

    async def _interrupt_locked(self, run: _Run, reason: str) -> None:
        """Stop a prompt on ComfyUI: the newer /api/jobs/{id}/cancel where the
        server has it; else remove it from ComfyUI's queue if pending, or
        POST /interrupt {prompt_id} if it is the running one. The job ends
        when ComfyUI confirms (the end marker, or polling), or at give_up_at."""
        self.lock.assert_held()
        run.interrupt, run.interrupt_sent = reason, True
        if run.give_up_at is None:
            run.give_up_at = self.clock() + self.config.cancel_grace
        pid = run.prompt_id
        try:
            if self.jobs_cancel_route is not False:
                cancelled = await self.client.cancel_job(pid)
                self.jobs_cancel_route = cancelled is not None
                if cancelled is not None:
                    _log_bridge.info("%s: asked ComfyUI to cancel prompt %s (%s)", run.job_id, pid,
                                     reason, extra={"job": run.job_id})
                    await self._after_stop_locked(run, await self.locate(pid), removed=cancelled)
                    return
            located = await self.locate(pid)
            if located.where == "pending":
                await self.client.delete_pending(pid)
                await self._after_stop_locked(run, await self.locate(pid), removed=True)
                return
            if located.where == "running":
                await self.client.interrupt(pid)
                _log_bridge.info("%s: interrupted prompt %s (%s)", run.job_id, pid, reason,
                                 extra={"job": run.job_id})
                return
            await self._after_stop_locked(run, located, removed=False)
        except BackendError as exc:
            run.interrupt_sent = False  # the tick asks again
            self.error(str(exc))

    async def _after_stop_locked(self, run: _Run, located: _Located, *, removed: bool) -> None:
        """What comfymgr knows once it asked ComfyUI to stop a prompt."""
        if located.where == "finished":
            await self._finish_locked(run, located.entry)
        elif located.where == "missing" and removed:
            # Taken out of ComfyUI's queue before it started: it never ran.
            await self._end_with_locked(run, "execution_interrupted", {}, [])
        elif located.where == "missing":
            self.request_reconcile()  # judged on a second look

    async def _give_up_locked(self, run: _Run) -> None:
        """ComfyUI did not confirm the interrupt in time (or could not be
        reached): recorded by comfymgr's clock; the prompt is abandoned."""
        self.lock.assert_held()
        self.abandon(run.prompt_id)
        await self._stopped_locked(run, detail=f"; ComfyUI did not confirm the interrupt within "
                                               f"{self.config.cancel_grace:g} s")


###############################################################################
# bridge: dispatch
###############################################################################
# Feeding one backend: the next job by priority then age, POST /prompt
# with comfymgr's prompt id (inline inputs uploaded first where no input
# folder is shared), what its answer means, back-off after failures, and
# taking a prefetched job back when a more urgent one arrives.


class _BackendDispatch(_BackendRuns):
    """A backend's dispatcher."""

    # -- the dispatcher task -------------------------------------------------------

    def can_take_another(self) -> bool:
        """One job at a time; with prefetch, one more waits in ComfyUI's own
        queue while the first runs (never two waiting). None while down,
        incompatible, or backing off after failed POSTs."""
        if not self.up or self.incompatible:
            return False
        if asyncio.get_running_loop().time() < self._dispatch_not_before:
            return False
        if not self.runs:
            return True
        if not self.config.prefetch or len(self.runs) > 1:
            return False
        # As soon as ComfyUI acknowledged the first: the next one then waits in
        # its queue and starts the moment the first ends, however short it is.
        [run] = self.runs.values()
        return run.started is not None or run.acknowledged

    def waiting_run(self) -> _Run | None:
        """The prefetched run: the later of two, handed to ComfyUI, not started."""
        if len(self.runs) < 2:
            return None
        last = next(reversed(self.runs.values()))
        return last if last.started is None and not last.posting else None

    async def dispatch_loop(self) -> None:
        """Feed this backend by priority then age (see can_take_another)."""
        while True:
            self.wake.clear()
            try:
                if self.up and self.waiting_run() is not None:
                    await self.preempt_if_overtaken()
                dispatched = self.can_take_another() and await self.dispatch_next()
            except ApiError as exc:
                # Storage unavailable. Try again in a second rather than on the
                # next wake: nothing may ring it while jobs wait.
                self.error(f"cannot claim a job: {exc.message}")
                await asyncio.sleep(1)
                continue
            except BackendError as exc:
                self.error(str(exc))
                dispatched = False
            if dispatched:
                if not self.can_take_another():
                    self.pass_on()
                continue
            wait = self._dispatch_not_before - asyncio.get_running_loop().time()
            if wait <= 0 and self.can_take_another():
                # Wake-ups are aimed at one backend per job; a free one also
                # looks on its own now and then, so none idles behind a missed one.
                wait = _IDLE_LOOK
            if wait > 0:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.wake.wait(), wait)
            else:
                await self.wake.wait()

    def _dispatch_failed(self, reason: str) -> None:
        """Back off: exponential with jitter, capped, reset by a success."""
        self.metrics.dispatch_failures.labels(self.name).inc()
        self._dispatch_failures += 1
        delay = min(_BACKOFF_MAX * 3, _BACKOFF_BASE * 2 ** min(self._dispatch_failures, 10))
        self._dispatch_not_before = asyncio.get_running_loop().time() + delay * random.uniform(0.5, 1.0)
        self.error(f"{reason}; dispatching again in {delay:.1f} s at most")

    async def dispatch_next(self) -> bool:
        """Claim the next job for this backend and POST it. False when none waits."""
        async with self.lock:
            if not self.can_take_another():
                return False
            prompt_id = _new_id()
            # Prefetching (a job runs here already) leaves shared jobs to a
            # backend with nothing to do: a GPU must not idle while a job waits
            # behind another one.
            pinned_only = bool(self.runs) and self.idle_elsewhere()
            seen = self.queue.queued_seq
            if self.found_nothing is not None and self.found_nothing[0] == seen \
                    and (pinned_only or not self.found_nothing[1]):
                return False  # nothing was queued since a claim found nothing
            job, more = await self.db.write(Storage.claim, self.name, prompt_id, self.now_ms(),
                                            pinned_only=pinned_only)
            self.found_nothing = None if more else (seen, pinned_only)
            if job is None:
                return False
            self.last_dispatch = asyncio.get_running_loop().time()
            run = self._attach(job)
            _log_bridge.info("dispatching %s to %s as prompt %s (attempt %d)", job.id,
                             self.name, prompt_id, job.attempts, extra={"job": job.id})
            run.posting = True
            try:
                if job.extra.get("inputs") and self.inputs.uploads:
                    try:
                        if not await self._upload_inputs_locked(run, job):
                            return True
                    except BackendError as exc:  # nothing was posted: back to the queue
                        self._dispatch_failed(f"uploading the job's inputs: {exc}")
                        await self._requeue_locked(run, **({} if not exc.sent else dict(
                            reason="dispatch_failed", count="dispatchFailures",
                            allowed=self.config.dispatch_attempts - 1, error={
                                "code": "dispatch_failed",
                                "message": f"ComfyUI {self.name} did not take the job's inputs "
                                           f"in {self.config.dispatch_attempts} attempts"})))
                        return True
                answer = await self.client.post_prompt(job.workflow, prompt_id, self.client_id or "")
            except BackendError as exc:
                self._dispatch_failed(str(exc))
                if not exc.sent:  # surely never reached ComfyUI: back to its place
                    await self._requeue_locked(run)
                else:  # its fate is unknown: reconcile settles it after a grace
                    run.post_unknown_since = self.clock()
                    self.request_reconcile()
                return True
            finally:
                run.posting = False
            await self._posted_locked(run, job, answer)
        return True

    async def _upload_inputs_locked(self, run: _Run, job: Job) -> bool:
        """The job's inline inputs, from the state directory to this backend
        (/upload/image, the name comfymgr chose; job-unique, so overwrite).
        False when the job cannot run (its inputs are gone): it has ended."""
        folder = _InputStore.subfolder(job.id)
        for name in job.extra["inputs"]:
            try:
                data = await self.inputs.read(job.id, name)
            except OSError as exc:
                await self._end_locked(run, JobState.FAILED, error={
                    "code": "inputs_missing", "message": f"the job's input {name} is no longer "
                    f"stored ({exc.strerror or exc}); submit it again"})
                return False
            answer = await self.client.upload_image(name, data, folder, True)
            if answer["name"] != name or str(answer.get("subfolder") or "") != folder:
                raise _ProtocolError(f"POST /upload/image stored {answer['name']!r} in "
                                     f"{answer.get('subfolder')!r}, not {name!r} in {folder!r}")
        return True

    async def _posted_locked(self, run: _Run, job: Job, answer: _PromptAnswer) -> None:
        self.lock.assert_held()
        if answer.status == 400:
            self._dispatch_failures, self._dispatch_not_before = 0, 0.0
            body = answer.body if isinstance(answer.body, dict) else {}
            await self._end_locked(run, JobState.FAILED, error=_invalid_workflow(body))
            return
        if answer.status != 200:
            # Refused by something that is not ComfyUI's validation (an auth
            # plug-in, a proxy, a wrong URL prefix): surely not queued.
            self._dispatch_failed(f"POST /prompt: HTTP {answer.status}")
            await self._requeue_locked(run, reason="dispatch_failed", count="dispatchFailures",
                                       allowed=self.config.dispatch_attempts - 1, error={
                                           "code": "dispatch_failed",
                                           "message": f"ComfyUI {self.name} refused the prompt "
                                                      f"{self.config.dispatch_attempts} times; "
                                                      f"the last answer was HTTP {answer.status}",
                                           "status": answer.status, "excerpt": answer.excerpt})
            return
        returned = answer.prompt_id
        if returned is None:
            # Accepted, but the answer does not say as what: reconcile looks
            # for comfymgr's id, and judges only after the grace.
            self._dispatch_failed(f"POST /prompt: HTTP 200 without a prompt_id ({answer.excerpt})")
            run.post_unknown_since = self.clock()
            self.request_reconcile()
            return
        self._dispatch_failures, self._dispatch_not_before = 0, 0.0
        if returned != run.prompt_id:
            # An older ComfyUI mints its own ids: follow this prompt under its
            # id, and send this server nothing more (a restart of comfymgr
            # between POST and record would lose track of the next one).
            self.incompatible = (f"ComfyUI {self.name} ignores the prompt_id comfymgr sends "
                                 f"(it answered {returned[:64]!r} for {run.prompt_id}); it gets no "
                                 "more jobs: upgrade it to a version that accepts a client "
                                 "prompt_id")
            self.error(self.incompatible)
            if await self.db.write(Storage.adopt_prompt_id, run.job_id, run.prompt_id, returned,
                                   self.now_ms()) is not None:
                run.prompt_id = returned
        run.acknowledged = True
        await self.db.write(Storage.mark_submitted, run.job_id, run.prompt_id, self.now_ms())
        if job.cancel_requested_at is not None or run.interrupt:
            await self._interrupt_locked(run, run.interrupt or "cancel")

    async def preempt_if_overtaken(self) -> None:
        """A job more urgent than the one waiting in ComfyUI's queue arrived:
        take the waiting one back (POST /queue delete) to its place in
        comfymgr's queue, so that priorities hold with prefetch too."""
        async with self.lock:
            run = self.waiting_run()
            if run is None:
                return
            head = await self.db.read(Storage.queue_head, self.name)
            if head is None or head[0] >= run.priority:
                return
            pid = run.prompt_id
            # Written before ComfyUI forgets the prompt: if what follows fails,
            # or comfymgr dies here, reconcile finds a prompt comfymgr removed
            # itself (see _missing_locked), not one ComfyUI lost.
            await self.db.write(Storage.note_attempt, run.job_id, pid, self.now_ms(), preempting=pid)
            await self.client.delete_pending(pid)
            located = await self.locate(pid)
            if located.where in ("running", "pending"):
                return  # it started first: it runs, the urgent job comes next
            if located.where == "finished":
                await self._finish_locked(run, located.entry)
                return
            _log_bridge.info("%s: a more urgent job arrived; taken back from ComfyUI's queue",
                             run.job_id, extra={"job": run.job_id})
            await self._requeue_locked(run, reason="preempted")


###############################################################################
# bridge: comfyui websocket
###############################################################################
# One socket per backend, a fresh clientId per connection; each message
# read as untrusted input and turned into progress, previews and the
# end of runs. A reconnect reconciles before anything is dispatched.


class _Backend(_BackendDispatch):
    """One ComfyUI server: state (_BackendState), runs settled
    (_BackendRuns), dispatch (_BackendDispatch), and its WebSocket here."""

    # -- the WebSocket task ------------------------------------------------------

    async def websocket_loop(self) -> None:
        """Stay connected; after a failed reconnect the jobs handed to this
        backend but not started go back to the shared queue."""
        failures = 0
        try:
            while True:
                client_id = _new_id()
                connected = False
                try:
                    async with self.client.websocket(
                            client_id, heartbeat=max(5.0, self.config.backend_timeout),
                            max_msg_size=_WS_MAX_MESSAGE) as ws:
                        # ComfyUI reads feature flags from the first message only:
                        # previews then come with their prompt and node.
                        await ws.send_str('{"type":"feature_flags","data":'
                                          '{"supports_preview_metadata":true}}')
                        await self._connected(client_id)
                        connected, failures = True, 0
                        async for message in ws:
                            if message.type == aiohttp.WSMsgType.TEXT:
                                await self._on_text(message.data)
                            elif message.type == aiohttp.WSMsgType.BINARY:
                                self._on_binary(message.data)
                            elif message.type == aiohttp.WSMsgType.ERROR:
                                break
                    reason = "the WebSocket closed"
                except asyncio.CancelledError:
                    raise
                except ApiError as exc:  # the reconcile after connecting could not write
                    reason = f"cannot record what ComfyUI said: {exc.message}"
                except BackendError as exc:
                    reason = str(exc)
                except _CONNECT_ERRORS as exc:
                    reason = f"cannot connect to {self.spec.url}: {exc}"
                except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError) as exc:
                    reason = f"WebSocket: {type(exc).__name__} {exc}".strip()
                self._disconnected(reason)
                if not connected:
                    failures += 1
                    await self.release_unstarted()
                delay = min(_BACKOFF_MAX, _BACKOFF_BASE * 2 ** min(failures, 10))
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))
        finally:
            self._disconnected(self.last_error or "stopped")

    def _disconnected(self, reason: str) -> None:
        if self.up:
            self.down_since = self.clock()
        self.up = False
        self.client_id = None
        self.error(reason)

    async def _connected(self, client_id: str) -> None:
        """A fresh socket: learn the server, then reconcile before dispatching,
        since whatever ComfyUI said while we were away is gone."""
        await self._learn_server()
        self.jobs_cancel_route = None
        self.incompatible = None  # a restarted server may be a newer one
        self.client_id = client_id
        self.up = True  # dispatch waits for the lock that reconcile holds
        await self.reconcile()
        self.last_error = None
        self.down_since = None
        self._dispatch_failures, self._dispatch_not_before = 0, 0.0
        _log_bridge.info("backend %s up (ComfyUI %s)", self.name, self.version,
                         extra={"backend": self.name})
        self.wake.set()

    async def _learn_server(self) -> None:
        """Version, devices and node schemas; an unreadable or slow answer
        keeps what was known and is said once. It is not a reason to stay
        down, nor to give back the jobs handed to this server: /object_info
        can outlast the backend timeout on a box with many node packs, while
        ComfyUI runs what it was given. Reconcile's /queue says whether it
        answers."""
        try:
            self.version, self.devices = _read_system_stats(await self.client.system_stats())
        except _ProtocolError as exc:
            self._warn_once("system_stats", "%s (%s); keeping what was known", exc, exc.excerpt)
        except BackendError as exc:
            self._warn_once("system_stats", "%s; keeping what was known", exc)
        try:
            info, dropped = _read_object_info(await self.client.object_info())
        except BackendError as exc:
            self._warn_once("object_info", "%s; submit-time checks use what was known", exc)
        else:
            if dropped:
                self._warn_once("object_info_entries", "%d /object_info entries are not node "
                                "schemas; workflows using them are checked by ComfyUI at "
                                "dispatch only", len(dropped))
            self.object_info, self.unreadable_classes = info, dropped

    def _ignored(self, reason: str, kind: str) -> None:
        self.metrics.messages_ignored.labels(self.name, reason).inc()
        if reason == "bad_shape":
            self._warn_once(f"shape:{kind}", "ignoring %r messages whose data is not of the "
                            "expected shape (said once per type)", kind[:100])
        else:
            _log_bridge.debug("backend %s: ignored a message (%s) %r", self.name, reason, kind[:100])

    def _on_binary(self, frame: bytes) -> None:
        """Preview images of a running prompt; anything else is ignored."""
        read = _read_binary_frame(frame)
        if read is None:
            self._ignored("unreadable", "binary")
            return
        event, content_type, image, metadata = read
        if event not in (_BINARY_PREVIEW, _BINARY_PREVIEW_WITH_METADATA):
            if event != _BINARY_TEXT:  # progress text of some nodes: known, not used
                self._ignored("unknown_type", f"binary {event}")
            return
        if metadata:
            run = self._run_for_prompt(metadata.get("prompt_id"))
            node = metadata.get("node_id")
        else:  # the legacy frame names no prompt: it is the running one's
            running = [r for r in self.runs.values() if r.started is not None]
            run, node = (running[0] if len(running) == 1 else None), None
        if run is None:
            return
        counter = run.preview.counter + 1 if run.preview else 1
        run.preview = _Preview(image, content_type, str(node) if _is_node_id(node) else None, counter)
        self._announce_preview(run)

    def _announce_preview(self, run: _Run) -> None:
        """workflow:preview at most every _PREVIEW_INTERVAL; a later one is
        sent when the interval is over, so the last preview is announced."""
        if run.preview_pending:
            return
        loop = asyncio.get_running_loop()
        wait = run.preview_announced + _PREVIEW_INTERVAL - loop.time()
        if wait <= 0:
            run.preview_announced = loop.time()
            self.on_preview(run)
            return
        run.preview_pending = True

        def later() -> None:
            run.preview_pending = False
            if self.runs.get(run.job_id) is run:
                self._announce_preview(run)
        loop.call_later(wait, later)

    async def _on_text(self, text: str) -> None:
        kind, data, problem = _read_message(text)
        if problem is not None:
            self._ignored(problem, kind)
            return
        if kind == "status":
            remaining = ((data.get("status") or {}).get("exec_info") or {})
            remaining = remaining.get("queue_remaining") if isinstance(remaining, dict) else None
            if isinstance(remaining, int) and not isinstance(remaining, bool):
                self.queue_remaining = remaining
            return
        run = self._run_for_prompt(data.get("prompt_id"))
        if run is None:
            return  # a prompt comfymgr did not send, or one already settled
        if kind == "execution_start":
            await self._mark_running(run)
        elif kind == "execution_cached":
            run.add_cached(str(n) for n in data["nodes"] if _is_node_id(n))
            run.recompute()
        elif kind == "executing":
            if data["node"] is None:
                # The end marker: ComfyUI has written the history by now.
                async with self.lock:
                    await self._finish_locked(run)
                return
            run.current_node, run.dirty = str(data["node"]), True
        elif kind == "progress":
            node, value, maximum = data.get("node"), data["value"], data["max"]
            if node is not None and maximum > 0:
                run.set_node(str(node), max(0.0, min(1.0, value / maximum)))
                run.current_node = str(node)
                run.recompute()
        elif kind == "progress_state":
            for node, state in data["nodes"].items():
                if not isinstance(state, dict):
                    continue
                value, maximum = state.get("value"), state.get("max")
                if state.get("state") == "finished":
                    run.set_node(str(node), 1.0)
                elif _is_number(value) and _is_number(maximum) and maximum > 0:
                    run.set_node(str(node), max(0.0, min(1.0, value / maximum)))
            run.recompute()
        elif kind == "executed":
            run.set_node(str(data["node"]), 1.0)
            run.recompute()
        elif kind in ("execution_success", "execution_error", "execution_interrupted"):
            run.ending = (kind, data)
        if run.dirty:
            await self._flush_progress(run)

    def _run_for_prompt(self, prompt_id: Any) -> _Run | None:
        if not isinstance(prompt_id, str):
            return None
        for run in self.runs.values():
            if run.prompt_id == prompt_id:
                return run
        return None


###############################################################################
# bridge: all backends
###############################################################################
# The backends together: start and stop, submit-time checks, cancels
# routed to the backend that holds the job, and whom a new job wakes.


class _Bridge:
    """All backends, and what spans them: start and stop, submit-time checks,
    cancels routed to the backend that holds the job."""

    def __init__(self, config: Config, db: _Database, queue_: _Queue, clock: Clock,
                 metrics: _Metrics, supervisor: _Supervisor, inputs: _InputStore) -> None:
        self.config = config
        self.db = db
        self.queue = queue_
        self.clock = clock
        self.supervisor = supervisor
        self.backends = {spec.name: _Backend(spec, config=config, db=db, queue_=queue_, clock=clock,
                                             metrics=metrics, inputs=inputs)
                         for spec in config.backend_specs}

    def _idle_besides(self, backend: _Backend) -> bool:
        return any(other is not backend and not other.runs and other.can_take_another()
                   for other in self.backends.values())

    def kick(self, target: str, priority: int) -> None:
        """Wake the one dispatcher that should take a job for `target`: the
        least busy backend that can take one; if none can, the backend whose
        job waiting in ComfyUI's queue is the least urgent, when the new job
        is more urgent (it takes that place back). One wake-up per job, not
        one per backend: 64 backends cost what 1 does."""
        backends = [self.backends[target]] if target in self.backends else list(self.backends.values())
        takers = [b for b in backends if b.can_take_another()]
        if takers:  # one not already woken first, then the least busy
            min(takers, key=lambda b: (b.wake.is_set(), len(b.runs), b.last_dispatch)).wake.set()
            return
        giving_way = [b for b in backends if b.up and (run := b.waiting_run()) is not None
                      and run.priority > priority]
        if giving_way:
            max(giving_way, key=lambda b: b.waiting_run().priority).wake.set()

    async def start(self) -> None:
        self.queue.on_work = self.kick
        for backend in self.backends.values():
            # A backend that filled up passes the work on: more may wait.
            backend.pass_on = lambda: self.kick(TARGET_ANY, int(Priority.LOW))
            backend.idle_elsewhere = functools.partial(self._idle_besides, backend)
        now = _ms(self.clock())
        for job in await self.db.write(Storage.fail_orphans, list(self.backends), now):
            _log_bridge.warning("failed %s: its backend is no longer configured", job.id,
                                extra={"job": job.id})
        in_flight = await self.db.read(Storage.in_flight)
        for backend in self.backends.values():
            await backend.client.open()
            for job in in_flight:
                if job.backend == backend.name:
                    run = backend._attach(job)
                    if job.state is JobState.DISPATCHING:
                        # Its POST may have been under way when comfymgr stopped:
                        # the grace runs from the claim (the row's last change),
                        # not from this start, so that restarts closer together
                        # than the grace cannot keep the backend waiting forever.
                        run.post_unknown_since = min(self.clock(), job.updated_at / 1000)
            for task in ("websocket", "dispatch", "tick"):
                self.supervisor.start(f"backend:{backend.name}:{task}",
                                      getattr(backend, f"{task}_loop"), on_error=backend.error)

    async def stop(self) -> None:
        await self.supervisor.stop("backend:")
        for backend in self.backends.values():
            await backend.client.close()

    def check_workflow(self, workflow: Mapping[str, Any], target: str) -> None:
        """Refuse at submit what ComfyUI would refuse, as far as a cached
        /object_info tells; with no backend known yet, accept (ComfyUI checks
        at dispatch)."""
        candidates = [self.backends[target]] if target != TARGET_ANY else list(self.backends.values())
        known = next((b for b in candidates if b.object_info), None)
        if known is None or known.object_info is None:
            return
        if known.unreadable_classes and any(
                isinstance(node, dict) and node.get("class_type") in known.unreadable_classes
                for node in workflow.values()):
            return  # a node whose schema comfymgr cannot read: ComfyUI judges it at dispatch
        problem = _check_workflow(workflow, known.object_info)
        if problem:
            error = _invalid_workflow(problem)
            raise BadRequest(error["message"], code="invalid_workflow", details=error["details"])

    async def request_cancel(self, job: Job) -> None:
        backend = self.backends.get(job.backend or "")
        if backend is not None:
            await backend.request_cancel(job)

    def preview(self, job: Job) -> _Preview | None:
        """The latest preview of a running job (kept in memory only)."""
        backend = self.backends.get(job.backend or "")
        run = backend.runs.get(job.id) if backend is not None else None
        return run.preview if run is not None and run.prompt_id == job.prompt_id else None


###############################################################################
# gpu
###############################################################################
# Real GPU figures from NVML (pynvml), read in one worker thread on an
# interval and labelled by physical GPU index; the event loop only reads the
# last snapshot. Without NVML (no driver, a CPU box, a container without
# /dev/nvidia*) the GPU metrics are absent and the reason is reported; a GPU
# that errors mid-run (fallen off the bus) is reported, never fatal.

_log_gpu = logging.getLogger("comfymgr.gpu")


@dataclasses.dataclass(frozen=True)
class GpuReading:
    index: int
    name: str | None = None
    uuid: str | None = None
    utilization: float | None = None      # percent, 0-100
    memory_used: int | None = None        # bytes
    memory_total: int | None = None       # bytes
    temperature: float | None = None      # degrees Celsius
    power: float | None = None            # watts
    error: str | None = None

    def view(self) -> dict[str, Any]:
        return {"index": self.index, "name": self.name, "uuid": self.uuid,
                "utilization": self.utilization, "memoryUsedBytes": self.memory_used,
                "memoryTotalBytes": self.memory_total, "temperatureCelsius": self.temperature,
                "powerWatts": self.power, "error": self.error}


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


class _GpuMonitor:
    """Polls NVML. `nvml` is the pynvml module, or a stand-in in tests."""

    def __init__(self, interval: float, clock: Clock, nvml: Any = None) -> None:
        self.interval = interval
        self.clock = clock
        self._nvml = nvml
        self.available = False
        self.reason: str | None = "not started"
        self.readings: dict[int, GpuReading] = {}
        self.read_at: float | None = None
        # The one thread that ever calls NVML (init, reads, shutdown).
        self._thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="comfymgr-nvml")

    async def _in_thread(self, fn: Callable[[], Any]) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn)

    async def start(self) -> None:
        try:
            count = await self._in_thread(self._init)
        except Exception as exc:  # noqa: BLE001 - any NVML failure means "no GPU figures"
            self.available, self.reason = False, f"NVML unavailable: {_text(exc) or type(exc).__name__}"
            _log_gpu.info("%s; GPU metrics are off", self.reason)
            return
        self.available, self.reason = True, None
        _log_gpu.info("NVML: %d GPU(s)", count)
        await self.poll()

    def _init(self) -> int:
        if self._nvml is None:
            import pynvml
            self._nvml = pynvml
        self._nvml.nvmlInit()
        return int(self._nvml.nvmlDeviceGetCount())

    async def poll(self) -> None:
        if self.available:
            self.readings = await self._in_thread(self._read_all)
            self.read_at = self.clock()

    async def poll_loop(self) -> None:
        """Supervised: an unexpected failure is reported and polling restarts
        (a failing GPU is not one: _read_all records it in its reading)."""
        while True:
            await asyncio.sleep(self.interval)
            await self.poll()

    def _read_all(self) -> dict[int, GpuReading]:
        nvml = self._nvml
        try:
            count = int(nvml.nvmlDeviceGetCount())
        except Exception as exc:  # noqa: BLE001
            return {i: GpuReading(i, error=_text(exc)) for i in self.readings}
        readings = {}
        for index in range(count):
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)
                reading = GpuReading(
                    index=index,
                    name=_text(nvml.nvmlDeviceGetName(handle)),
                    uuid=_text(nvml.nvmlDeviceGetUUID(handle)),
                    utilization=float(nvml.nvmlDeviceGetUtilizationRates(handle).gpu),
                    memory_used=int(memory.used), memory_total=int(memory.total),
                    temperature=float(nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU)),
                    power=self._power(handle))
            except Exception as exc:  # noqa: BLE001 - e.g. GPU is lost: report, keep the rest
                previous = self.readings.get(index)
                reading = GpuReading(index, name=previous.name if previous else None,
                                     uuid=previous.uuid if previous else None,
                                     error=_text(exc) or type(exc).__name__)
                if not previous or previous.error != reading.error:
                    _log_gpu.warning("GPU %d: %s", index, reading.error)
            readings[index] = reading
        return readings

    def _power(self, handle: Any) -> float | None:
        try:  # not every board reports power
            return self._nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0
        except Exception:  # noqa: BLE001
            return None

    async def stop(self) -> None:
        if self.available:
            with contextlib.suppress(Exception):
                await self._in_thread(self._nvml.nvmlShutdown)
            self.available = False
        self._thread.shutdown(wait=False)

    def view(self, backends: Mapping[int, list[str]]) -> dict[str, Any]:
        return {"available": self.available, "reason": self.reason,
                "readAt": _ms(self.read_at) if self.read_at else None,
                "devices": [{**r.view(), "backends": backends.get(r.index, [])}
                            for r in self.readings.values()]}


###############################################################################
# stream hub
###############################################################################
# /v1/comfyui/stream: committed events fanned out to WebSocket clients.
# Every event reaches publish() once, on the event loop, in seq order; each
# client has a bounded queue drained by its own sender task, so a slow
# client only ever hurts itself (it is closed with 1013). A client resuming
# with `since` gets the stored events first, then the live ones, with the
# seam deduplicated by seq.

_log_stream = logging.getLogger("comfymgr.stream")

_MAX_SUBSCRIPTIONS = 1000
_REPLAY_PAGE = 500
_MAX_SEQ = 2**63 - 1  # seqs are SQLite integers: a larger `since` cannot even be queried
_CLIENT_MESSAGES_PER_WINDOW, _INVALID_PER_WINDOW, _FLOOD_WINDOW = 60, 10, 10.0
_CLOSE_TRY_AGAIN_LATER = 1013  # RFC 6455 registry: "Try Again Later"


class _Outgoing:
    """One queued message. With `coalesce` ("progress", "preview"), a newer
    message of that kind for the same job supersedes it while it waits.
    One object is queued to every subscriber that wants it: whether it was
    superseded is each subscriber's own (its `pending`), never the object's."""

    __slots__ = ("seq", "job_id", "text", "coalesce")

    def __init__(self, seq: int, job_id: str | None, text: str, coalesce: str | None = None) -> None:
        self.seq, self.job_id, self.text = seq, job_id, text
        self.coalesce = coalesce

    @property
    def key(self) -> str:
        return f"{self.coalesce}:{self.job_id}"


class _Subscriber:
    """One stream client. The handler's coroutine reads the client's messages;
    the sender task writes queued messages. Every write to the socket holds
    `send_lock`, so replays and acks never interleave with queued events."""

    def __init__(self, ws: web.WebSocketResponse, hub: _Hub, client: str,
                 owner: str | None = None) -> None:
        self.ws = ws
        self.hub = hub
        self.client = client
        self.owner = owner  # a client key's name: only its jobs' events; None: all
        self.follow_all = True
        self.workflow_ids: set[str] = set()
        self.queue: collections.deque[_Outgoing] = collections.deque()
        self.live = 0                                  # queued messages not superseded
        self.pending: dict[str, _Outgoing] = {}       # coalescing messages waiting, by key
        self.previews = True                           # workflow:preview wanted
        self.ready = asyncio.Event()
        self.send_lock = asyncio.Lock()
        self.sent_upto = 0                 # replay at connect: everything <= this was sent
        self.replayed_upto: dict[str, int] = {}  # replay on subscribe: per workflow
        self.last_heartbeat = hub.clock()
        self.recent: collections.deque[tuple[float, bool]] = collections.deque()
        self.sender: asyncio.Task[None] | None = None
        self.closing: asyncio.Future[None] | None = None  # the close under way

    def wants(self, event: Event) -> bool:
        if self.owner is not None and event.owner != self.owner:
            return False
        return self.follow_all or event.job_id in self.workflow_ids

    def offer(self, item: _Outgoing) -> None:
        """Queue a message without ever blocking; a client too far behind is closed."""
        if self.closing:
            return
        if item.coalesce and item.job_id is not None:
            if item.key in self.pending:  # an older one still waits here: superseded
                self.live -= 1
            self.pending[item.key] = item
        if self.live >= self.hub.config.ws_send_queue:
            self.hub.kill(self, _CLOSE_TRY_AGAIN_LATER,
                          f"more than {self.hub.config.ws_send_queue} messages behind; reconnect with since")
            return
        self.queue.append(item)
        self.live += 1
        self.ready.set()

    async def send(self, payload: dict[str, Any] | str) -> None:
        text = payload if isinstance(payload, str) else _dumps(payload)
        async with self.send_lock:
            await self.ws.send_str(text)

    async def sender_loop(self) -> None:
        while True:
            await self.ready.wait()
            self.ready.clear()
            while self.queue:
                item = self.queue.popleft()
                if item.coalesce and item.job_id is not None:
                    if self.pending.get(item.key) is not item:
                        continue  # superseded while it waited (not counted in live)
                    del self.pending[item.key]
                self.live -= 1
                async with self.send_lock:
                    # Checked under the lock a replay holds while it sends, so
                    # what the replay sent is skipped here, never sent twice.
                    if item.seq and (item.seq <= self.sent_upto or
                                     item.seq <= self.replayed_upto.get(item.job_id or "", 0)):
                        continue
                    await self.ws.send_str(item.text)


class _Hub:
    def __init__(self, db: _Database, config: Config, clock: Clock,
                 supervisor: _Supervisor) -> None:
        self.db = db
        self.config = config
        self.clock = clock
        self.supervisor = supervisor
        self.subscribers: set[_Subscriber] = set()
        self.latest_seq = 0
        self._tasks: set[asyncio.Task[Any]] = set()

    # -- fan-out ---------------------------------------------------------------

    def publish(self, events: Sequence[Event]) -> None:
        """Called on the event loop for every commit, in seq order."""
        for event in events:
            self.latest_seq = max(self.latest_seq, event.seq)
            if not self.subscribers:
                continue
            item = None
            for sub in list(self.subscribers):
                if sub.wants(event):
                    if item is None:  # serialised once, shared by every client
                        item = _Outgoing(event.seq, event.job_id, _dumps(event.message()),
                                         "progress" if event.type == EVENT_PROGRESS else None)
                    sub.offer(item)

    def publish_preview(self, job_id: str, owner: str, node_id: str | None, counter: int) -> None:
        """workflow:preview: ephemeral (no seq, not stored, never replayed),
        to the clients that follow the job and want previews."""
        item = None
        probe = Event(0, job_id, EVENT_PREVIEW, 0, {}, owner)
        for sub in list(self.subscribers):
            if sub.previews and sub.wants(probe):
                if item is None:
                    item = _Outgoing(0, job_id, _dumps({
                        "type": EVENT_PREVIEW, "workflowId": job_id, "nodeId": node_id,
                        "url": f"/v1/comfyui/workflow/{job_id}/preview", "counter": counter,
                        "timestamp": _ms(self.clock())}), "preview")
                sub.offer(item)

    def kill(self, sub: _Subscriber, code: int, reason: str) -> None:
        if sub.closing:
            return
        self.subscribers.discard(sub)
        _log_stream.info("closing stream client %s: %s", sub.client, reason, extra={"client": sub.client})
        sub.closing = task = asyncio.ensure_future(self._close(sub, code, reason))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _close(self, sub: _Subscriber, code: int, reason: str) -> None:
        if sub.sender is not None:
            sub.sender.cancel()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(sub.ws.close(code=code, message=reason.encode()[:120]), 2.0)

    async def close_all(self) -> None:
        """Shutdown: every client gets 1001 (going away)."""
        for sub in list(self.subscribers):
            self.kill(sub, aiohttp.WSCloseCode.GOING_AWAY, "server shutting down")
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def tick(self) -> None:
        """Heartbeats, by the injectable clock."""
        now = self.clock()
        for sub in list(self.subscribers):
            if self.config.heartbeat and now - sub.last_heartbeat >= self.config.heartbeat:
                sub.last_heartbeat = now
                sub.offer(_Outgoing(0, None, _dumps({"type": "heartbeat", "seq": self.latest_seq})))

    async def tick_loop(self) -> None:
        period = max(0.05, min(1.0, self.config.heartbeat or 1.0))
        while True:
            await asyncio.sleep(period)
            await self.tick()

    async def prune_loop(self) -> None:
        """Drop events past the retention, a bounded batch at a time."""
        while True:
            await self.prune()
            await asyncio.sleep(min(3600.0, max(60.0, self.config.event_retention / 10)))

    async def prune(self) -> int:
        cutoff = _ms(self.clock() - self.config.event_retention)
        total = 0
        while True:
            try:
                deleted = await self.db.write(Storage.prune_events, cutoff)
            except ApiError:
                return total
            total += deleted
            if deleted < 10_000:
                break
        if total:
            _log_stream.info("removed %d events older than the retention", total)
        return total

    # -- one client ------------------------------------------------------------

    async def serve(self, sub: _Subscriber, *, since: int | None, workflow_ids: Sequence[str]) -> None:
        known: set[str] = set()
        if workflow_ids:
            known = await self._known(sub, workflow_ids)
            sub.follow_all = False
            sub.workflow_ids.update(known)
        self.subscribers.add(sub)  # from here on, live events queue up for it
        try:
            if workflow_ids:
                await self._ack(sub, "subscribed", unknown=[w for w in workflow_ids if w not in known])
            if since is not None:
                await self._replay(sub, since, None if sub.follow_all else sorted(sub.workflow_ids))
            sub.sender = asyncio.create_task(self._send_for(sub))
            sub.ready.set()
            async for message in sub.ws:
                if message.type == aiohttp.WSMsgType.TEXT:
                    await self._on_client_message(sub, message.data)
                elif message.type == aiohttp.WSMsgType.BINARY:
                    await self._invalid(sub, "binary messages are not understood; send JSON text")
                if sub.closing:
                    break
        finally:
            self.subscribers.discard(sub)
            if sub.sender is not None:
                sub.sender.cancel()
                await asyncio.gather(sub.sender, return_exceptions=True)
            if sub.closing is not None:  # let the close frame go out before the handler ends
                await asyncio.gather(sub.closing, return_exceptions=True)

    async def _known(self, sub: _Subscriber, ids: Sequence[str]) -> set[str]:
        """The ids the client may follow: its own jobs' (a client key), or any job's."""
        return set(await self.db.read(Storage.get_many, ids, sub.owner))

    async def _send_for(self, sub: _Subscriber) -> None:
        """The client's sender task. A client that went away ends it quietly;
        anything else is a failure of comfymgr's: reported, and the client
        is closed with 1011 so that it reconnects and resumes with since."""
        try:
            await sub.sender_loop()
        except asyncio.CancelledError:
            raise
        except (ConnectionError, aiohttp.ClientError):
            self.kill(sub, aiohttp.WSCloseCode.GOING_AWAY, "connection lost")
        except Exception as exc:  # noqa: BLE001 - supervised: reported, the client resumes
            self.supervisor.report("stream:sender", exc)
            self.kill(sub, aiohttp.WSCloseCode.INTERNAL_ERROR, "internal error; reconnect with since")

    async def _replay(self, sub: _Subscriber, since: int, ids: Sequence[str] | None) -> None:
        """Send the stored events after `since` (of `ids`, or of everything the
        client follows), oldest first, holding the client's send lock; the
        sender then skips what this sent. The one replay: at connect and on
        a subscribe with since."""
        async with sub.send_lock:
            # Every await under the lock: a live event offered meanwhile (its
            # workflow is already followed) waits, then is skipped as replayed.
            oldest, _ = await self.db.read(Storage.event_bounds)
            if oldest and since < oldest - 1:
                await sub.ws.send_str(_dumps({
                    "type": "error", "code": "since_expired",
                    "message": f"events after seq {since} are no longer all kept (retention "
                               f"{self.config.event_retention:g} s); replaying from the oldest "
                               f"kept, seq {oldest}", "since": since, "oldestSeq": oldest}))
            cursor = since
            while True:
                page = await self.db.read(Storage.events_since, cursor, job_ids=ids, owner=sub.owner,
                                          limit=_REPLAY_PAGE)
                for event in page:
                    await sub.ws.send_str(_dumps(event.message()))
                    cursor = event.seq
                    if ids is None:
                        sub.sent_upto = event.seq
                    else:
                        sub.replayed_upto[event.job_id] = event.seq
                if len(page) < _REPLAY_PAGE:
                    return

    async def _ack(self, sub: _Subscriber, kind: str, **extra: Any) -> None:
        ack = {"type": kind, "all": sub.follow_all, "workflowIds": sorted(sub.workflow_ids)}
        ack.update({k: v for k, v in extra.items() if v})
        await sub.send(ack)

    async def _invalid(self, sub: _Subscriber, message: str) -> None:
        if self._flooding(sub, invalid=True):
            return
        await sub.send({"type": "error", "code": "invalid_message", "message": message})

    def _flooding(self, sub: _Subscriber, *, invalid: bool) -> bool:
        """Too many client messages (or invalid ones) in the window: 1008."""
        now = self.clock()
        sub.recent.append((now, invalid))
        while sub.recent and now - sub.recent[0][0] > _FLOOD_WINDOW:
            sub.recent.popleft()
        bad = sum(1 for _, was_invalid in sub.recent if was_invalid)
        if len(sub.recent) > _CLIENT_MESSAGES_PER_WINDOW or bad > _INVALID_PER_WINDOW:
            self.kill(sub, aiohttp.WSCloseCode.POLICY_VIOLATION, "too many messages")
            return True
        return False

    async def _on_client_message(self, sub: _Subscriber, text: str) -> None:
        try:
            message = _loads(text)
        except ValueError:
            await self._invalid(sub, "messages must be JSON objects")
            return
        if not isinstance(message, dict) or not isinstance(message.get("type"), str):
            await self._invalid(sub, 'messages must be JSON objects with a "type"')
            return
        kind = message["type"]
        if kind not in ("subscribe", "unsubscribe", "ping"):
            await self._invalid(sub, f"unknown message type {kind!r}; use subscribe, unsubscribe or ping")
            return
        if self._flooding(sub, invalid=False):
            return
        if kind == "ping":
            await sub.send({"type": "pong", "seq": self.latest_seq})
            return
        ids = message.get("workflowIds", [])
        if "workflowId" in message:
            ids = [message["workflowId"], *ids] if isinstance(ids, list) else ids
        since = message.get("since")
        if (not isinstance(ids, list) or not all(isinstance(i, str) and 0 < len(i) <= 64 for i in ids)
                or (since is not None and (not isinstance(since, int) or isinstance(since, bool)
                                           or not 0 <= since <= _MAX_SEQ))
                or not isinstance(message.get("previews", True), bool)):
            await self._invalid(sub, f'use {{"type": "{kind}", "workflowId": "<id>"}} or '
                                     f'"workflowIds": [...]; "since" must be a seq >= 0; '
                                     f'"previews" true or false')
            return
        if kind == "subscribe" and "previews" in message:
            sub.previews = message["previews"]
        if kind == "unsubscribe":
            if message.get("all") is True:
                sub.follow_all = False
                sub.workflow_ids.clear()
            sub.workflow_ids.difference_update(ids)
            await self._ack(sub, "unsubscribed")
            return
        if message.get("all") is True:
            sub.follow_all, sub.workflow_ids = True, set()
            await self._ack(sub, "subscribed")
            return
        if len(sub.workflow_ids) + len(ids) > _MAX_SUBSCRIPTIONS:
            await sub.send({"type": "error", "code": "too_many_subscriptions",
                            "message": f"a socket may follow at most {_MAX_SUBSCRIPTIONS} workflows"})
            return
        known = await self._known(sub, ids)
        new = sorted(known - sub.workflow_ids)
        sub.follow_all = False
        sub.workflow_ids.update(known)
        if since is not None and new:
            # Live events of the new workflows queue up from here; the stored
            # ones are sent first, and the sender skips what was replayed.
            await self._replay(sub, since, new)
        await self._ack(sub, "subscribed", unknown=[i for i in ids if i not in known])


###############################################################################
# outbound
###############################################################################
# Where comfymgr's own outbound requests (webhooks; input URLs of a submit)
# may go. By default only to public addresses: never to loopback, private
# networks, CGNAT, link-local (cloud metadata lives there), multicast,
# unspecified or broadcast addresses, IPv4 hidden in IPv6 (mapped, 6to4,
# NAT64) included, and never to a configured ComfyUI backend, whose API has
# no authentication (a webhook to its /interrupt would stop another client's
# job). COMFYMGR_WEBHOOK_ALLOW names the hosts and networks let through
# anyway; a backend's own host and port stay refused even then. Checked when
# a URL is accepted and again after DNS on every connection, so a name cannot
# be re-pointed inward between the two.

_log_outbound = logging.getLogger("comfymgr.outbound")

_METADATA_ADDRESSES = frozenset(ipaddress.ip_address(a) for a in (
    "169.254.169.254", "169.254.170.2", "fd00:ec2::254", "100.100.100.200"))
_CGNAT = ipaddress.ip_network("100.64.0.0/10")
_PRIVATE_NETWORKS = tuple(ipaddress.ip_network(n) for n in (
    "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7"))
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")
_LEGACY_IPV4 = re.compile(r"^(0x[0-9a-f]+|[0-9]+)(\.(0x[0-9a-f]+|[0-9]+)){0,3}$")


class OutboundRefused(ComfymgrError):
    """A URL or address comfymgr may not send requests to; the message says why."""


def _unwrap_ip(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> Any:
    """The IPv4 address an IPv6 address carries (mapped, 6to4, NAT64,
    IPv4-compatible), else the address itself."""
    if ip.version == 6:
        if ip.ipv4_mapped is not None:
            return ip.ipv4_mapped
        if ip.sixtofour is not None:
            return ip.sixtofour
        if ip in _NAT64 or (ip in _IPV4_COMPATIBLE and int(ip) > 1):
            return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return ip


def _ip_of_host(host: str) -> Any:
    """The address a URL's host names without DNS: IPv4 and IPv6 literals,
    and the legacy IPv4 forms resolvers accept (2130706433, 0177.0.0.1,
    0x7f.1); None for a name."""
    host = host.strip("[]").lower()
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    if _LEGACY_IPV4.match(host):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            return None
    return None


def _refusal(ip: Any) -> str | None:
    """Why an address is not a public one comfymgr may send to, or None."""
    ip = _unwrap_ip(ip)
    if ip in _METADATA_ADDRESSES:
        return "a cloud metadata address"
    if ip.is_loopback:
        return "a loopback address"
    if ip.is_unspecified:
        return "the unspecified address"
    if ip.is_link_local:
        return "a link-local address"
    if ip.is_multicast:
        return "a multicast address"
    if ip.version == 4 and ip in _CGNAT:
        return "a shared (CGNAT) address"
    if ip.version == 6 and ip in _NAT64_LOCAL:
        return "a local NAT64 address"
    if ip == ipaddress.IPv4Address("255.255.255.255"):
        return "the broadcast address"
    if any(ip in net for net in _PRIVATE_NETWORKS):
        return "a private-network address"
    if not ip.is_global:  # documentation, benchmarking, reserved ranges
        return "not a public address"
    return None


def _default_port(scheme: str) -> int:
    return 443 if scheme == "https" else 80


class _TargetPolicy:
    """The rule above, for one configuration. `resolver` answers DNS (tests
    pass one of their own)."""

    def __init__(self, allow: Sequence[Any], backends: Sequence[BackendSpec],
                 resolver: aiohttp.abc.AbstractResolver | None = None) -> None:
        self._resolver = resolver
        self.hosts = frozenset(a for a in allow if isinstance(a, str))
        self.networks = tuple(a for a in allow if not isinstance(a, str))
        self.backend_urls: set[tuple[str, str, int]] = set()
        self.backend_addresses: set[tuple[Any, int]] = set()
        for spec in backends:
            url = yarl.URL(spec.url)
            port = url.port or _default_port(url.scheme)
            self.backend_urls.add((url.scheme, (url.host or "").lower(), port))
            ip = _ip_of_host(url.host or "")
            if ip is not None:
                self.backend_addresses.add((_unwrap_ip(ip), port))
            elif url.host:
                with contextlib.suppress(OSError):  # names: what they resolve to now
                    for info in socket.getaddrinfo(url.host, port, proto=socket.IPPROTO_TCP):
                        self.backend_addresses.add((_unwrap_ip(ipaddress.ip_address(
                            info[4][0].split("%")[0])), port))

    @property
    def resolver(self) -> aiohttp.abc.AbstractResolver:
        if self._resolver is None:  # made on the event loop, where it runs
            self._resolver = aiohttp.ThreadedResolver()
        return self._resolver

    def check_address(self, host: str, address: Any, port: int) -> str | None:
        """Why host:port at this address is refused, or None."""
        ip = _unwrap_ip(address)
        # Every loopback address reaches a backend listening on loopback.
        if (ip, port) in self.backend_addresses or any(
                backend_port == port and backend_ip.is_loopback and ip.is_loopback
                for backend_ip, backend_port in self.backend_addresses):
            return "a ComfyUI backend"
        if host.lower().rstrip(".") in self.hosts or any(ip in net for net in self.networks):
            return None  # the operator named it
        return _refusal(ip)

    async def check_url(self, url: str, *, field: str, code: str) -> yarl.URL:
        """The URL parsed, if comfymgr may send to it; BadRequest otherwise.
        A name is resolved (2 s at most): refused when every address it has
        is; one that does not resolve now is accepted (checked at send)."""
        try:
            parsed = yarl.URL(url)
        except (ValueError, TypeError):
            parsed = None
        if parsed is None or parsed.scheme not in ("http", "https") or not parsed.host:
            raise BadRequest(f"{field}: must be an http:// or https:// URL with a host",
                             details={"field": field})
        host, port = parsed.host.lower().rstrip("."), parsed.port or _default_port(parsed.scheme)
        if (parsed.scheme, host, port) in self.backend_urls:
            self._refuse(field, code, parsed, "a ComfyUI backend")
        ip = _ip_of_host(host)
        if ip is not None:
            reason = self.check_address(host, ip, port)
            if reason:
                self._refuse(field, code, parsed, reason)
            return parsed
        try:
            infos = await asyncio.wait_for(self.resolver.resolve(host, port, socket.AF_UNSPEC), 2.0)
        except (OSError, asyncio.TimeoutError, UnicodeError):
            return parsed
        reasons = [self.check_address(host, ipaddress.ip_address(info["host"].split("%")[0]), port)
                   for info in infos]
        if reasons and all(reasons):
            self._refuse(field, code, parsed, f"{reasons[0]} (what {host} resolves to)")
        return parsed

    @staticmethod
    def _refuse(field: str, code: str, url: yarl.URL, reason: str) -> None:
        raise BadRequest(f"{field}: {_redact_url(str(url))} is {reason}; comfymgr sends requests "
                         "only to public addresses (see COMFYMGR_WEBHOOK_ALLOW)",
                         code=code, details={"field": field, "reason": reason})


class _CheckedResolver(aiohttp.abc.AbstractResolver):
    """Resolves like aiohttp, then drops every address the policy refuses."""

    def __init__(self, policy: _TargetPolicy) -> None:
        self._policy = policy

    async def resolve(self, host: str, port: int = 0, family: int = 0) -> list[dict[str, Any]]:
        infos = await self._policy.resolver.resolve(host, port, family)
        allowed = [info for info in infos if not self._policy.check_address(
            host, ipaddress.ip_address(info["host"].split("%")[0]), port)]
        if not allowed:
            raise OutboundRefused(f"{host} resolves only to addresses comfymgr may not send to")
        return allowed

    async def close(self) -> None:
        pass  # the policy's resolver outlives any one session


def _outbound_session(policy: _TargetPolicy, timeout: float, *, limit: int) -> aiohttp.ClientSession:
    """A client session that reaches only what the policy allows: checked
    after DNS; IP literals (which skip the resolver) are checked by callers
    through check_literal."""
    connector = aiohttp.TCPConnector(resolver=_CheckedResolver(policy), limit=limit, force_close=True)
    # No cookie jar: one receiver's cookies must never travel to another.
    return aiohttp.ClientSession(connector=connector, auto_decompress=False, trust_env=False,
                                 cookie_jar=aiohttp.DummyCookieJar(),
                                 timeout=aiohttp.ClientTimeout(total=timeout, sock_connect=timeout))


def _check_literal(policy: _TargetPolicy, url: yarl.URL) -> None:
    """aiohttp connects to an IP literal without asking the resolver: check it here."""
    ip = _ip_of_host(url.host or "")
    if ip is not None:
        reason = policy.check_address(url.host or "", ip, url.port or _default_port(url.scheme))
        if reason:
            raise OutboundRefused(f"{url.host} is {reason}")


def _redact_url(url: str) -> str:
    """A URL fit for logs and answers: user info and query values masked
    (they often carry tokens)."""
    try:
        parsed = yarl.URL(url)
    except (ValueError, TypeError):
        return "(not a URL)"
    if parsed.user is not None or parsed.password is not None:
        parsed = parsed.with_user("***").with_password(None)
    if parsed.query_string:
        masked = "&".join(f"{k}=***" for k in parsed.query)
        parsed = parsed.with_query(None)
        return str(parsed.with_fragment(None)) + "?" + masked
    return str(parsed.with_fragment(None))


###############################################################################
# webhooks
###############################################################################
# Durable, signed deliveries of job events to applications. A delivery row
# is written in the transaction of its event (storage), so nothing between
# commit and send can lose it; this section sends what is due, signs it the
# Standard Webhooks way, retries with backoff and jitter, never follows a
# redirect, and sends only where the outbound policy allows. One delivery's
# failure, however odd, is recorded on that delivery and never stops another.

_log_webhooks = logging.getLogger("comfymgr.webhooks")

WEBHOOK_EVENTS = ("queued", "started", "completed", "error", "cancelled")
_DEFAULT_WEBHOOK_EVENTS = ("completed", "error", "cancelled")
_WEBHOOK_RESPONSE_LIMIT = 64 * 1024
_WEBHOOK_CONCURRENCY = 16
WEBHOOK_SECRET_FILE = "webhook-secret"


def _sign_webhook(secrets_: Sequence[bytes], msg_id: str, timestamp: int, body: bytes) -> str:
    """Standard Webhooks: `v1,<base64 HMAC-SHA256 of "id.timestamp.body">`,
    one per secret, space-separated."""
    signed = f"{msg_id}.{timestamp}.".encode() + body
    return " ".join("v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
                    for key in secrets_)


def _retry_after(value: str | None, now: float) -> float | None:
    """Seconds from a Retry-After header: ASCII digits, or an HTTP date;
    None for anything else."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return float(min(int(value[:12]), 10**9))
    if not _http_date_ok(value):
        return None
    when = email.utils.parsedate_to_datetime(value)
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - now)


def _http_date_ok(value: str) -> bool:
    try:
        return email.utils.parsedate_to_datetime(value) is not None
    except (TypeError, ValueError, IndexError, OverflowError):
        return False


class _Webhooks:
    def __init__(self, config: Config, db: _Database, metrics: _Metrics, clock: Clock,
                 policy: _TargetPolicy, supervisor: _Supervisor) -> None:
        self.config = config
        self.db = db
        self.metrics = metrics
        self.clock = clock
        self.policy = policy
        self.supervisor = supervisor
        self.secrets: tuple[bytes, ...] = config.webhook_secrets
        self.session: aiohttp.ClientSession | None = None
        self.wake = asyncio.Event()
        self._in_flight: set[str] = set()
        # include=data: (job, outputs) -> the outputs with their bytes (the
        # files section's, wired by create_app).
        self.with_data: Callable[[Job, list[dict[str, Any]]], Any] | None = None

    async def start(self) -> None:
        self.session = _outbound_session(self.policy, self.config.webhook_timeout,
                                         limit=_WEBHOOK_CONCURRENCY)

    async def stop(self) -> None:
        if self.session is not None:
            await self.session.close()

    async def check(self, spec: Mapping[str, Any]) -> dict[str, Any]:
        """The submit's webhook, normalised; BadRequest naming what is wrong."""
        url = await self.policy.check_url(spec["url"], field="webhook.url", code="webhook_forbidden")
        events = list(dict.fromkeys(spec.get("events") or _DEFAULT_WEBHOOK_EVENTS))
        return {"url": str(url), "events": events,
                **({"include": list(spec["include"])} if spec.get("include") else {})}

    # -- sending -----------------------------------------------------------------

    async def loop(self) -> None:
        while True:
            self.wake.clear()
            try:
                await self.deliver_due()
                following = await self.db.read(Storage.next_delivery_at)
            except ApiError:
                following = None
            delay = 5.0 if following is None else max(0.05, following / 1000 - self.clock())
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.wake.wait(), min(delay, 5.0))

    async def deliver_due(self) -> int:
        """Send every delivery that is due now; returns how many were tried."""
        now = _ms(self.clock())
        rows = [r for r in await self.db.read(Storage.due_deliveries, now, limit=200)
                if r["id"] not in self._in_flight]
        for row in rows:
            self._in_flight.add(row["id"])
        try:
            await asyncio.gather(*(self._attempt(row) for row in rows))
        finally:
            self._in_flight.difference_update(r["id"] for r in rows)
        return len(rows)

    async def _attempt(self, row: sqlite3.Row) -> None:
        """One try of one delivery. Whatever happens is recorded on it."""
        try:
            status, error, retryable, retry_after = await self._post(row)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - one delivery never stops the others
            self.supervisor.report("webhooks:delivery", exc)
            status, error, retryable, retry_after = None, "internal error", True, None
        try:
            await self._record(row, status, error, retryable, retry_after)
        except ApiError as exc:
            _log_webhooks.warning("cannot record webhook %s: %s", row["id"], exc.message)

    async def _post(self, row: sqlite3.Row) -> tuple[int | None, str | None, bool, float | None]:
        """(HTTP status, error category, retry?, Retry-After seconds)."""
        assert self.session is not None
        msg_id, body = row["id"], await self._body(row)
        timestamp = int(self.clock())
        headers = {"Content-Type": "application/json", "User-Agent": f"comfymgr/{__version__}",
                   "webhook-id": msg_id, "webhook-timestamp": str(timestamp),
                   "webhook-signature": _sign_webhook(self.secrets, msg_id, timestamp, body)}
        url = yarl.URL(row["url"])
        try:
            _check_literal(self.policy, url)
            async with self.session.post(url, data=body, headers=headers,
                                         allow_redirects=False) as resp:
                status = resp.status
                retry_after = _retry_after(resp.headers.get("Retry-After"), self.clock())
                await resp.content.read(_WEBHOOK_RESPONSE_LIMIT)  # never more than that
        except OutboundRefused as exc:
            self._log_failure(row, f"refused: {exc}")
            return None, "refused: not an address comfymgr may send to", False, None
        except asyncio.TimeoutError:
            self._log_failure(row, "timed out")
            return None, "timed out", True, None
        except (aiohttp.ClientError, OSError) as exc:
            self._log_failure(row, f"{type(exc).__name__}: {exc}")
            return None, "unreachable", True, None
        if 200 <= status < 300:
            return status, None, False, None
        return status, f"HTTP {status}", status == 429 or status >= 500, retry_after

    async def _body(self, row: sqlite3.Row) -> bytes:
        """The payload: the event as the stream sends it. A completion's
        outputs get absolute URLs (COMFYMGR_PUBLIC_URL) and, with
        include=data, their bytes (read now: never in the event's transaction)."""
        if row["event_type"] != "workflow:completed":
            return row["payload"].encode()
        payload = json.loads(row["payload"])
        outputs = payload.get("outputs") or []
        if self.with_data is not None and outputs:
            job = await self.db.read(Storage.get, row["job_id"])
            if job is not None and "data" in (job.extra.get("webhook") or {}).get("include", ()):
                outputs = await self.with_data(job, outputs)
        if self.config.public_url:
            outputs = [{**o, "url": self.config.public_url.rstrip("/") + o["url"]} for o in outputs]
        payload["outputs"] = outputs
        return _dumps(payload).encode()

    def _log_failure(self, row: sqlite3.Row, detail: str) -> None:
        _log_webhooks.info("webhook %s to %s: %s", row["id"], _redact_url(row["url"]), detail,
                           extra={"job": row["job_id"]})

    async def _record(self, row: sqlite3.Row, status: int | None, error: str | None,
                      retryable: bool, retry_after: float | None) -> None:
        now_s = self.clock()
        now, attempt = _ms(now_s), row["attempts"] + 1
        next_at = None
        if error is None:
            state, outcome = "delivered", "sent"
        elif not retryable:
            state, outcome = "failed", "failed"
        elif (attempt >= self.config.webhook_max_attempts
              or now_s - row["created_at"] / 1000 >= self.config.webhook_max_age):
            state, outcome = "failed", "failed"
        else:
            delay = min(3600.0, self.config.webhook_backoff * 2 ** (attempt - 1)) * random.uniform(0.8, 1.2)
            if retry_after is not None:
                delay = max(delay, min(retry_after, self.config.webhook_max_age))
            state, outcome, next_at = "pending", "retried", now + _ms(delay)
        await self.db.write(Storage.record_attempt, row["id"], now, state=state, status=status,
                            error=error, next_at=next_at)
        self.metrics.webhook_deliveries.labels(outcome).inc()
        log = _log_webhooks.info if outcome == "sent" else _log_webhooks.warning
        log("webhook %s (%s) to %s: %s after attempt %d%s", row["id"], row["event_type"],
            _redact_url(row["url"]), state, attempt, f" ({error})" if error else "",
            extra={"job": row["job_id"]})


###############################################################################
# files
###############################################################################
# Models, outputs and inputs. Every walk, stat, hash and read of a file runs
# in this section's worker threads, never on the event loop. Files are served
# only from real paths inside the configured roots: the path is resolved,
# checked against the root, opened without following a final symlink, and
# the opened descriptor's own path (/proc/self/fd) is checked again, so a
# symlink swapped in between check and open cannot lead outside (the hole
# ComfyUI's /view has, upstream issue #12285).

_log_files = logging.getLogger("comfymgr.files")

# API type -> (Config attribute, ComfyUI's folder name for GET /models/<folder>)
MODEL_TYPES: dict[str, tuple[str, str]] = {
    "checkpoints": ("models_checkpoints", "checkpoints"),
    "loras": ("models_loras", "loras"),
    "vae": ("models_vae", "vae"),
    "controlnet": ("models_controlnet", "controlnet"),
    "upscale": ("models_upscale", "upscale_models"),
}
# ComfyUI's supported_pt_extensions, plus GGUF.
_MODEL_EXTENSIONS = frozenset({".safetensors", ".ckpt", ".pt", ".pt2", ".pth", ".bin", ".pkl",
                               ".sft", ".gguf"})
_IMAGE_SIGNATURES = ((b"\x89PNG\r\n\x1a\n", ".png"), (b"\xff\xd8\xff", ".jpg"),
                     (b"GIF87a", ".gif"), (b"GIF89a", ".gif"), (b"BM", ".bmp"),
                     (b"II*\x00", ".tif"), (b"MM\x00*", ".tif"))
_IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff"})
_CHUNK = 256 * 1024
_UPLOAD_NAME_TRIES = 20


class _TooLarge(Exception):
    """An output over the inline limit (include=data)."""
_DISK_USAGE_INTERVAL = 60.0


@dataclasses.dataclass(frozen=True)
class _FileInfo:
    rel: str          # path below its root, "/"-separated
    size: int
    mtime_ns: int


def _walk_files(root: Path, *, follow_links: bool, suffixes: frozenset[str] | None = None
                ) -> tuple[list[_FileInfo], list[str]]:
    """Regular files below root (and the folders that could not be read).
    With follow_links, directory symlinks are followed once each (no loops)."""
    files: list[_FileInfo] = []
    problems: list[str] = []
    seen_dirs: set[tuple[int, int]] = set()
    root_text = str(root)

    def on_error(exc: OSError) -> None:
        problems.append(f"{exc.filename}: {exc.strerror or exc}")

    for folder, dirs, names in os.walk(root_text, onerror=on_error, followlinks=follow_links):
        try:
            st = os.stat(folder)
        except OSError as exc:
            on_error(exc)
            dirs[:] = []
            continue
        if (st.st_dev, st.st_ino) in seen_dirs:
            dirs[:] = []
            continue
        seen_dirs.add((st.st_dev, st.st_ino))
        dirs.sort()
        prefix = os.path.relpath(folder, root_text)
        for name in names:
            if suffixes is not None and os.path.splitext(name)[1].lower() not in suffixes:
                continue
            full = os.path.join(folder, name)
            try:
                st = os.stat(full) if follow_links else os.lstat(full)
            except OSError as exc:
                on_error(exc)
                continue
            if not stat.S_ISREG(st.st_mode):
                continue
            rel = name if prefix == "." else f"{prefix}/{name}".replace(os.sep, "/")
            files.append(_FileInfo(rel, st.st_size, st.st_mtime_ns))
    return files, problems


def _check_rel_path(rel: str) -> None:
    """Refuse what is never a file name below a root: NUL, backslashes,
    absolute paths, empty, '.' or '..' components."""
    if "\x00" in rel or "\\" in rel:
        raise BadRequest("the path contains a NUL byte or a backslash", code="invalid_path",
                         details={"path": rel.replace("\x00", "\\x00")})
    if rel.startswith("/") or any(part in ("", ".", "..") for part in rel.split("/")):
        raise BadRequest("the path must be relative, without '.', '..' or empty parts",
                         code="invalid_path", details={"path": rel})


def _open_inside(root: Path, rel: str) -> tuple[int, os.stat_result, str]:
    """Open root/rel read-only if its real path is a regular file inside the
    real root; NotFound otherwise (never saying which check failed)."""
    _check_rel_path(rel)
    missing = NotFound("no such file", details={"path": rel})
    root_real = os.path.realpath(root)
    real = os.path.realpath(os.path.join(root_real, rel))
    if not real.startswith(root_real.rstrip(os.sep) + os.sep):
        raise missing
    try:
        fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        raise missing from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise missing
        proc = f"/proc/self/fd/{fd}"
        if os.path.exists(proc) and os.readlink(proc) != real:
            raise missing  # a path component changed under us
    except BaseException:
        os.close(fd)
        raise
    return fd, st, real


def _sha256_file(path: str, stop: threading.Event) -> str | None:
    """The file's SHA-256, or None when `stop` was set meanwhile (checked
    every MiB, so a 10 GB checkpoint never holds up a shutdown)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            if stop.is_set():
                return None
            digest.update(chunk)
    return digest.hexdigest()


def _safe_name(name: str, *, what: str) -> str:
    """A file or folder name ComfyUI will accept back: its basename, no
    control characters, no leading dots, at most 200 characters."""
    name = name.replace("\\", "/").rsplit("/", 1)[-1].strip()
    name = "".join(c for c in name if c.isprintable() and c not in '<>:"|?*')
    name = name.lstrip(".").strip()
    if not name or len(name) > 200:
        raise BadRequest(f"{what}: not a usable file name", code="invalid_request",
                         details={"field": what})
    return name


def _numbered(name: str, n: int) -> str:
    """ComfyUI's rule for a taken name: 'stem (1).ext', 'stem (2).ext', ..."""
    stem, ext = os.path.splitext(name)
    return name if n == 0 else f"{stem} ({n}){ext}"


def _write_unique(folder: Path, name: str, data: bytes, overwrite: bool) -> str:
    """Write data as folder/name, or as 'stem (1).ext' ... when it exists and
    overwrite is off. The whole file is written under a temporary name, then
    given its name atomically: replacing (overwrite), or with a hard link
    that fails when the name is taken, so two uploads of one name at once
    never replace each other."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{name[:100]}.{secrets.token_hex(8)}.part"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o644)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        if overwrite:
            os.replace(tmp, folder / name)
            return name
        for n in range(10_000):
            candidate = _numbered(name, n)
            try:
                os.link(tmp, folder / candidate)
            except FileExistsError:
                continue
            except OSError as exc:  # no hard links here (some network filesystems)
                if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EXDEV, errno.EMLINK):
                    raise
                return _create_unique(folder, name, data)
            return candidate
        raise BadRequest(f"image: too many files named like {name}", details={"field": "image"})
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _create_unique(folder: Path, name: str, data: bytes) -> str:
    """_write_unique where hard links are not possible: the name is claimed
    with O_EXCL, then written."""
    for n in range(10_000):
        candidate = _numbered(name, n)
        try:
            fd = os.open(folder / candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            continue
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        return candidate
    raise BadRequest(f"image: too many files named like {name}", details={"field": "image"})


_CLIENT_FOLDER = re.compile(r"c-[0-9a-f]{16}")


def _client_input_folder(salt: bytes, name: str) -> str:
    """The input subfolder of a client key's uploads, named by a keyed hash
    of its name: stable across key rotations, unguessable by other keys."""
    return "c-" + hmac.new(salt, b"inputs:" + name.encode(), hashlib.sha256).hexdigest()[:16]


def _check_input_references(salt: bytes, owner: str, workflow: Mapping[str, Any]) -> None:
    """A client key's workflow may name its own uploads, never another key's."""
    own = _client_input_folder(salt, owner)
    for node_id, node in workflow.items():
        for name, value in node["inputs"].items():
            if isinstance(value, str) and any(m != own for m in _CLIENT_FOLDER.findall(value)):
                raise BadRequest(f"workflow.{node_id}.inputs.{name}: refers to an input uploaded "
                                 "with another key", code="foreign_input",
                                 details={"field": f"workflow.{node_id}.inputs.{name}",
                                          "nodeId": node_id})


###############################################################################
# files: serving
###############################################################################
# _Files: model listings with background hashes, output listings and
# downloads (from COMFYUI_OUTPUTS, or through the backend's /view), outputs
# inline (include=data), uploads named free on every backend, disk use; and
# retention. Built on the safe-path helpers above.


class _Files:
    """Model listings (with background SHA-256), output listings, safe
    downloads, uploads, retention and disk use."""

    def __init__(self, config: Config, db: _Database, clock: Clock) -> None:
        self.config = config
        self.db = db
        self.clock = clock
        self.roots: dict[str, Path | None] = {"output": config.outputs_dir, "temp": config.temp_dir}
        # Walks and reads run here; hashing has its own thread so that a
        # 10 GB checkpoint never delays a listing.
        self._pool = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="comfymgr-files")
        self._hash_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="comfymgr-hash")
        self._stopping = threading.Event()  # set by close(): the hashing thread gives up
        self._hash_queue: asyncio.Queue[tuple[str, int, int]] = asyncio.Queue()
        self._hashing: set[str] = set()
        self.disk: dict[str, Any] = {}
        self.filesystems: dict[str, dict[str, Any]] = {}

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def close(self) -> None:
        """Stop the worker threads; a hash under way gives up within a MiB."""
        self._stopping.set()
        if self._hashing:
            _log_files.info("hashing of %s stopped: comfymgr is stopping", ", ".join(sorted(self._hashing)))
        self._pool.shutdown(wait=False, cancel_futures=True)
        await asyncio.get_running_loop().run_in_executor(
            None, functools.partial(self._hash_pool.shutdown, wait=True, cancel_futures=True))

    # -- models ------------------------------------------------------------------

    async def models(self, types: Sequence[str], backends: Sequence[_Backend]) -> dict[str, Any]:
        hashes = await self.db.read(Storage.model_hashes)
        models: list[dict[str, Any]] = []
        folders: list[dict[str, Any]] = []
        for type_ in types:
            attr, comfy_folder = MODEL_TYPES[type_]
            root: Path | None = getattr(self.config, attr)
            if root is None:
                folders.append(await self._backend_models(type_, comfy_folder, backends, models))
                continue
            found = await self.run(
                lambda r=root: _walk_files(r, follow_links=True, suffixes=_MODEL_EXTENSIONS)
                if r.is_dir() else None)
            if found is None:
                folders.append({"type": type_, "source": "folder", "path": str(root),
                                "status": "missing", "error": f"{root} is not a folder"})
                continue
            files, problems = found
            folder = {"type": type_, "source": "folder", "path": str(root),
                      "status": "partial" if problems else "ok"}
            if problems:
                folder["error"] = "; ".join(problems[:5])
            folders.append(folder)
            for info in sorted(files, key=lambda f: f.rel):
                full = str(root / info.rel)
                cached = hashes.get(full)
                digest = cached[2] if cached and cached[:2] == (info.size, info.mtime_ns) else None
                if digest is None:
                    self._want_hash(full, info.size, info.mtime_ns)
                models.append({"name": info.rel, "type": type_, "size": info.size, "hash": digest,
                               "modified": info.mtime_ns // 1_000_000, "source": "folder"})
        return {"models": models, "folders": folders}

    async def _backend_models(self, type_: str, comfy_folder: str, backends: Sequence[_Backend],
                              models: list[dict[str, Any]]) -> dict[str, Any]:
        """No folder configured: ComfyUI's own GET /models/<folder> names."""
        for backend in backends:
            if not backend.up:
                continue
            try:
                names = await backend.client.models(comfy_folder)
            except BackendError as exc:
                return {"type": type_, "source": "comfyui", "backend": backend.name,
                        "status": "unavailable", "error": str(exc)}
            models.extend({"name": name, "type": type_, "size": None, "hash": None,
                           "modified": None, "source": "comfyui"} for name in sorted(names))
            return {"type": type_, "source": "comfyui", "backend": backend.name, "status": "ok"}
        return {"type": type_, "source": "comfyui", "status": "unavailable",
                "error": "not configured, and no ComfyUI server is reachable to ask"}

    def _want_hash(self, path: str, size: int, mtime_ns: int) -> None:
        if path not in self._hashing:
            self._hashing.add(path)
            self._hash_queue.put_nowait((path, size, mtime_ns))

    async def hash_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            path, size, mtime_ns = await self._hash_queue.get()
            try:
                digest = await loop.run_in_executor(self._hash_pool, _sha256_file, path,
                                                    self._stopping)
                if digest is None:
                    continue  # comfymgr is stopping
                st = await self.run(os.stat, path)
                if (st.st_size, st.st_mtime_ns) == (size, mtime_ns):  # unchanged while hashed
                    await self.db.write(Storage.store_model_hash, path, size, mtime_ns, digest)
            except (OSError, ApiError) as exc:
                _log_files.warning("cannot hash %s: %s", path, exc)
            finally:
                self._hashing.discard(path)
                self._hash_queue.task_done()

    async def hashes_done(self) -> None:
        """Until every queued hash is computed (tests, benchmarks)."""
        await self._hash_queue.join()

    # -- outputs -------------------------------------------------------------------

    def root(self, type_: str) -> Path:
        root = self.roots.get(type_)
        if root is None:
            raise NotFound(f"no {type_} folder is configured (COMFYUI_"
                           f"{'OUTPUTS' if type_ == 'output' else 'TEMP'})",
                           code="not_configured", details={"type": type_})
        return root

    async def list_outputs(self, type_: str, *, limit: int, after: tuple[int, str] | None,
                           owner: str | None = None
                           ) -> tuple[list[dict[str, Any]], tuple[int, str] | None]:
        """Newest first; keyset cursor (mtime_ns, path). With `owner` (a
        client key's name), only the files its jobs produced."""
        root = self.root(type_)
        if owner is None:
            files, _ = await self.run(
                lambda: _walk_files(root, follow_links=False) if root.is_dir() else ([], []))
        else:
            owned = await self.db.read(Storage.outputs, type_, owner=owner)
            files = await self.run(self._stat_existing, root, list(owned))
        files.sort(key=lambda f: (-f.mtime_ns, f.rel))
        start = 0
        if after is not None:
            keys = [(-f.mtime_ns, f.rel) for f in files]
            start = bisect.bisect_right(keys, (-after[0], after[1]))
        page = files[start:start + limit]
        owners = await self.db.read(Storage.outputs, type_, paths=[f.rel for f in page])
        items = [self._output_item(type_, f, owners.get(f.rel)) for f in page]
        more = start + limit < len(files)
        return items, ((page[-1].mtime_ns, page[-1].rel) if more and page else None)

    @staticmethod
    def _stat_existing(root: Path, rels: Sequence[str]) -> list[_FileInfo]:
        found = []
        for rel in rels:
            try:
                fd, st, _ = _open_inside(root, rel)
            except ApiError:
                continue
            os.close(fd)
            found.append(_FileInfo(rel, st.st_size, st.st_mtime_ns))
        return found

    async def job_outputs(self, job: Job) -> list[dict[str, Any]]:
        """A job's recorded outputs that still exist, with size and time (when
        its folder is configured; else as recorded, served through ComfyUI)."""
        def stat_all() -> list[dict[str, Any]]:
            items = []
            for out in job.outputs or []:
                root = self.roots.get(out["type"])
                rel = _output_path(out)
                if root is None:
                    items.append({"filename": out["filename"], "subfolder": out.get("subfolder", ""),
                                  "workflowId": job.id, "type": out["type"], "size": None,
                                  "createdAt": None, "url": out["url"]})
                    continue
                try:
                    fd, st, _ = _open_inside(root, rel)
                except ApiError:
                    continue
                os.close(fd)
                items.append(self._output_item(out["type"], _FileInfo(rel, st.st_size, st.st_mtime_ns),
                                               job.id))
            return items
        return await self.run(stat_all)

    @staticmethod
    def _output_item(type_: str, info: _FileInfo, job_id: str | None) -> dict[str, Any]:
        subfolder, _, filename = info.rel.rpartition("/")
        record = _output_record("", {"filename": filename, "subfolder": subfolder, "type": type_})
        return {"filename": filename, "subfolder": subfolder, "workflowId": job_id, "type": type_,
                "size": info.size, "createdAt": info.mtime_ns // 1_000_000, "url": record["url"]}

    async def with_data(self, job: Job, outputs: Sequence[dict[str, Any]],
                        backends: Mapping[str, _Backend]) -> list[dict[str, Any]]:
        """The outputs with their bytes inline (include=data): "data"
        (base64) and "contentType", or "dataOmitted" (too_large, missing,
        unavailable) with only the url."""
        limit = self.config.inline_max_bytes
        out = []
        for item in outputs:
            rel = _output_path(item)
            try:
                data = await self.read_output(job, item["type"], rel, limit, backends)
            except _TooLarge:
                out.append({**item, "dataOmitted": "too_large"})
                continue
            except (ApiError, BackendError) as exc:
                _log_files.info("%s: no data for %s: %s", job.id, rel, exc)
                out.append({**item, "dataOmitted": "missing" if isinstance(exc, NotFound)
                            else "unavailable"})
                continue
            out.append({**item, "contentType": mimetypes.guess_type(item["filename"])[0]
                        or "application/octet-stream", "data": base64.b64encode(data).decode()})
        return out

    async def read_output(self, job: Job, type_: str, rel: str, limit: int,
                          backends: Mapping[str, _Backend]) -> bytes:
        """A job's output file, from its folder when configured, else from
        the backend that made it (ComfyUI's /view); _TooLarge past `limit`."""
        root = self.roots.get(type_)
        if root is not None:
            def read() -> bytes:
                fd, st, _ = _open_inside(root, rel)
                try:
                    if st.st_size > limit:
                        raise _TooLarge()
                    return os.pread(fd, st.st_size, 0)
                finally:
                    os.close(fd)
            return await self.run(read)
        backend = backends.get(job.backend or "")
        if backend is None:
            raise NotFound("no such file", details={"path": rel})
        subfolder, _, filename = rel.rpartition("/")
        async with backend.client.view(filename, subfolder, type_) as resp:
            if resp.status == 404:
                raise NotFound("no such file", details={"path": rel})
            if resp.status != 200:
                raise BackendError(f"GET /view: HTTP {resp.status}")
            if (resp.content_length or 0) > limit:
                raise _TooLarge()
            data = bytearray()
            try:
                async for chunk in resp.content.iter_chunked(_CHUNK):
                    data.extend(chunk)
                    if len(data) > limit:
                        raise _TooLarge()
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                raise BackendError(f"GET /view: {type(exc).__name__} {exc}") from None
            return bytes(data)

    async def open(self, type_: str, rel: str) -> tuple[int, os.stat_result, str]:
        root = self.root(type_)
        return await self.run(_open_inside, root, rel)

    # -- inputs ----------------------------------------------------------------------

    async def store_input(self, name: str, data: bytes, subfolder: str, overwrite: bool,
                          backends: Sequence[_Backend]) -> dict[str, Any]:
        """Store an input image where LoadImage finds it: in COMFYUI_INPUTS
        when set, else on each of `backends` through its /upload/image, under
        one name free on all of them. Another file is replaced only when
        `overwrite` asks for it. Returns {name, subfolder, type, backends}."""
        if self.config.inputs_dir is not None:
            saved = await self._save_input(subfolder, name, data, overwrite)
            return {"name": saved, "subfolder": subfolder, "type": "input", "backends": []}
        # ComfyUI keeps a name that is free (or holds the same bytes) and
        # renames the upload otherwise. Each server is asked for the same
        # name; when one renames, the name it chose is asked of all, until
        # every server holds these bytes under one name.
        candidate = name
        for _ in range(_UPLOAD_NAME_TRIES):
            try:
                stored = [str((await b.client.upload_image(candidate, data, subfolder, overwrite))["name"])
                          for b in backends]
            except BackendError as exc:
                _log_files.warning("upload of %s to ComfyUI failed: %s", candidate, exc)
                raise ServiceUnavailable("a ComfyUI server did not take the upload; try again",
                                         code="backend_unavailable") from None
            renamed = [n for n in stored if n != candidate]
            if not renamed:
                return {"name": candidate, "subfolder": subfolder, "type": "input",
                        "backends": [b.name for b in backends]}
            candidate = renamed[0]
        raise ServiceUnavailable(f"no name like {name} is free on every ComfyUI server",
                                 code="backend_unavailable")

    async def _save_input(self, subfolder: str, name: str, data: bytes, overwrite: bool) -> str:
        root = self.config.inputs_dir
        assert root is not None

        def write() -> str:
            folder = Path(os.path.realpath(root))
            target = folder.joinpath(*subfolder.split("/")) if subfolder else folder
            real = os.path.realpath(target)
            if real != str(folder) and not real.startswith(str(folder) + os.sep):
                raise BadRequest("subfolder: outside the input folder", details={"field": "subfolder"})
            return _write_unique(Path(real), name, data, overwrite)

        return await self.run(write)

    # -- retention and disk use ---------------------------------------------------------

    async def delete_outputs_of(self, job: Job) -> int:
        """Delete the files a removed job produced, unless a newer job now
        claims the same file (a cached re-run reuses its file names)."""
        paths = [(o["type"], _output_path(o)) for o in job.outputs or []]
        owners: dict[tuple[str, str], str] = {}
        for type_ in {t for t, _ in paths}:
            found = await self.db.read(Storage.outputs, type_, paths=[p for t, p in paths if t == type_])
            owners.update(((type_, p), j) for p, j in found.items())

        def unlink() -> int:
            removed = 0
            for type_, rel in paths:
                root = self.roots.get(type_)
                if root is None or owners.get((type_, rel), job.id) != job.id:
                    continue
                try:
                    fd, _, real = _open_inside(root, rel)
                    os.close(fd)
                    os.unlink(real)
                    removed += 1
                except (ApiError, OSError):
                    continue
            return removed
        return await self.run(unlink)

    async def measure_disk(self) -> None:
        for type_, root in self.roots.items():
            if root is None or not await self.run(root.is_dir):
                continue
            files, _ = await self.run(lambda r=root: _walk_files(r, follow_links=False))
            usage = await self.run(shutil.disk_usage, root)
            self.disk[type_] = {"path": str(root), "files": len(files),
                                "bytes": sum(f.size for f in files),
                                "filesystemFreeBytes": usage.free,
                                "filesystemTotalBytes": usage.total,
                                "measuredAt": _ms(self.clock())}

    async def measure_filesystems(self) -> None:
        """Free and total bytes of the filesystems comfymgr writes to or
        reads from: one statvfs each, cheap enough for every pass."""
        folders = {"state": self.config.state_dir, "output": self.roots["output"],
                   "temp": self.roots["temp"], "input": self.config.inputs_dir}
        found = {}
        for name, folder in folders.items():
            if folder is None:
                continue
            try:
                usage = await self.run(shutil.disk_usage, folder)
            except OSError as exc:
                _log_files.warning("cannot measure the %s filesystem (%s): %s", name, folder, exc)
                continue
            found[name] = {"path": str(folder), "freeBytes": usage.free, "sizeBytes": usage.total}
        self.filesystems = found

    async def disk_loop(self) -> None:
        while True:
            await self.measure_filesystems()
            try:
                await self.measure_disk()
            except OSError as exc:
                _log_files.warning("cannot measure the output folders: %s", exc)
            await asyncio.sleep(_DISK_USAGE_INTERVAL)


class _Retention:
    """COMFYMGR_RETENTION_DAYS: finished jobs, their events and (optionally)
    their files are removed once they are older than that."""

    def __init__(self, config: Config, db: _Database, files: _Files, metrics: _Metrics,
                 clock: Clock) -> None:
        self.config, self.db, self.files, self.metrics, self.clock = config, db, files, metrics, clock

    async def run_once(self) -> dict[str, int]:
        removed = {"jobs": 0, "events": 0, "files": 0}
        expired_keys = _ms(self.clock() - self.config.idempotency_ttl)
        await self.db.write(Storage.prune_idempotency, expired_keys)
        if not self.config.retention_days:
            return removed
        cutoff = _ms(self.clock() - self.config.retention_days * 86400)
        while True:
            jobs, events = await self.db.write(Storage.delete_expired, cutoff)
            if not jobs:
                break
            removed["jobs"] += len(jobs)
            removed["events"] += events
            if self.config.retention_delete_outputs:
                for job in jobs:
                    removed["files"] += await self.files.delete_outputs_of(job)
        for kind, n in removed.items():
            if n:
                self.metrics.retention_removed.labels(kind).inc(n)
        if any(removed.values()):
            _log_files.info("retention (%d days): removed %d jobs, %d events, %d files",
                            self.config.retention_days, removed["jobs"], removed["events"],
                            removed["files"])
        return removed

    async def loop(self) -> None:
        while True:
            try:
                await self.run_once()
            except ApiError as exc:
                _log_files.warning("retention pass failed: %s", exc.message)
            await asyncio.sleep(3600)


###############################################################################
# http api
###############################################################################
# What every handler shares: the app keys, the open and unlimited routes,
# JSON answers and bodies, query strings checked against their schemas, and
# the job as the API shows it.

_log_http = logging.getLogger("comfymgr.http")

CONFIG = web.AppKey("config", Config)
CLOCK = web.AppKey("clock", Callable)
METRICS = web.AppKey("metrics", _Metrics)
DB = web.AppKey("db", _Database)
QUEUE = web.AppKey("queue", _Queue)
API_KEYS = web.AppKey("api_keys", tuple)
STARTED_AT = web.AppKey("started_at", float)
BRIDGE = web.AppKey("bridge", _Bridge)
SUPERVISOR = web.AppKey("supervisor", _Supervisor)
INPUTS = web.AppKey("inputs", _InputStore)
FETCHER = web.AppKey("fetcher", aiohttp.ClientSession)
HUB = web.AppKey("hub", _Hub)
GPUS = web.AppKey("gpus", _GpuMonitor)
FILES = web.AppKey("files", _Files)
WEBHOOKS = web.AppKey("webhooks", _Webhooks)
POLICY = web.AppKey("policy", _TargetPolicy)
RETENTION = web.AppKey("retention", _Retention)
INPUT_SALT = web.AppKey("input_salt", bytes)

@dataclasses.dataclass(frozen=True)
class _Key:
    secret: bytes
    name: str       # "admin" for MANAGEMENT_API_KEY keys, else the client key's name
    admin: bool


@dataclasses.dataclass(frozen=True)
class _Principal:
    """Who sent a request: an admin key (sees everything) or a client key
    (sees only the jobs submitted with a key of its name)."""

    name: str
    admin: bool
    key_id: bytes   # SHA-256 of the key itself: scopes Idempotency-Key

    @property
    def owner(self) -> str | None:
        """The owner filter for job reads: None (everything) for admins."""
        return None if self.admin else self.name


# request[PRINCIPAL]: who the API key that authenticated the request belongs to.
PRINCIPAL: Any = web.RequestKey("principal", _Principal) if hasattr(web, "RequestKey") else "comfymgr.principal"
# The dashboard's page and files (ui, ui_files) hold no data; what they show
# comes from the keyed API.
_OPEN_ROUTES = frozenset({"health", "metrics", "openapi", "docs", "docs_init", "docs_assets",
                          "ui", "ui_files"})
# Open for monitoring, so never rate limited either (Prometheus, load balancers).
_UNLIMITED_ROUTES = frozenset({"health", "metrics"})

_MAX_PAGE = 500
_MAX_INLINE_INPUTS = 16
_MAX_BODY_NESTING = 64  # objects and arrays inside each other, in a JSON request body
_DEFAULT_PAGE = 50

_NODE_SCHEMA = {
    "type": "object",
    "required": ["class_type", "inputs"],
    "properties": {
        "class_type": {"type": "string", "minLength": 1, "description": "The node's class."},
        "inputs": {"type": "object", "description": "Values, or links [node id, output index]."},
    },
    "description": "One node of an API-format ComfyUI graph (extra keys such as _meta are kept).",
}
_WORKFLOW_SCHEMA: dict[str, Any] = {
    "type": "object", "minProperties": 1, "additionalProperties": _NODE_SCHEMA,
    "description": "The API-format graph: node id -> node (ComfyUI's 'Export (API)').",
}
SUBMIT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["workflow"],
    "additionalProperties": False,
    "properties": {
        "workflow": _WORKFLOW_SCHEMA,
        "priority": {"type": "string", "enum": list(PRIORITY_NAMES), "default": "normal"},
        "gpu": {"type": "string", "default": "local", "minLength": 1, "maxLength": 128,
                "description": "local or any: any backend; or one backend's name."},
        "timeout": {"type": "number", "exclusiveMinimum": 0, "maximum": 7 * 86400,
                    "description": "Run-time limit in seconds (default COMFYMGR_JOB_TIMEOUT)."},
        "webhook": {
            "type": "object", "required": ["url"], "additionalProperties": False,
            "description": "POST signed events of this job to url (Standard Webhooks).",
            "properties": {
                "url": {"type": "string", "maxLength": 2048,
                        "description": "An http:// or https:// URL on a public address."},
                "events": {"type": "array", "minItems": 1, "maxItems": len(WEBHOOK_EVENTS),
                           "items": {"type": "string", "enum": list(WEBHOOK_EVENTS)},
                           "default": list(_DEFAULT_WEBHOOK_EVENTS)},
                "include": {"type": "array", "maxItems": 1, "items": {"type": "string", "enum": ["data"]},
                            "description": "[\"data\"]: the completed event carries each output "
                                           "file inline (base64), up to COMFYMGR_INLINE_MAX_BYTES."},
            },
        },
        "inputs": {
            "type": "object", "maxProperties": _MAX_INLINE_INPUTS,
            "additionalProperties": {"type": "string", "minLength": 1},
            "description": "Input images sent with the workflow: name -> a data: URI "
                           "(data:image/png;base64,...), bare base64, or an http(s) URL comfymgr "
                           "fetches. Every string input of the workflow equal to a name is "
                           "replaced by the stored image's name (e.g. LoadImage's image: "
                           "\"photo\" with inputs {\"photo\": ...}).",
        },
    },
}
WAIT_QUERY_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "wait": {"type": "number", "minimum": 0, "maximum": 86400,
                 "description": "Hold the answer until the job ended, at most this many seconds "
                                "(capped by COMFYMGR_MAX_WAIT)."},
        "include": {"type": "string", "enum": ["data"],
                    "description": "data: each output file inline (base64, with contentType), up "
                                   "to COMFYMGR_INLINE_MAX_BYTES (else dataOmitted)."},
    },
}
def _check_graph(graph: Any, path: tuple[str, ...]) -> tuple[tuple[str, ...], str] | None:
    """_WORKFLOW_SCHEMA, checked the way _Schema would, in a third of the
    time (a 184-node graph: from 1.8 ms). tests/test_api.py holds the two
    to the same answers."""
    if type(graph) is not dict:
        return path, "must be an object"
    if not graph:
        return path, "must not be empty"
    for node_id, node in graph.items():
        if type(node) is not dict:
            return path + (node_id,), "must be an object"
        if "class_type" not in node:
            return path + (node_id, "class_type"), "is required"
        if "inputs" not in node:
            return path + (node_id, "inputs"), "is required"
        for name, value in node.items():
            if name == "class_type":
                if type(value) is not str:
                    return path + (node_id, name), "must be a string"
                if not value:
                    return path + (node_id, name), "must be at least 1 characters"
            elif name == "inputs" and type(value) is not dict:
                return path + (node_id, name), "must be an object"
    return None


_Schema.fast[id(_WORKFLOW_SCHEMA)] = _check_graph

LIST_QUERY_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "status": {"type": "string", "enum": list(PUBLIC_STATUSES)},
        "priority": {"type": "string", "enum": list(PRIORITY_NAMES)},
        "limit": {"type": "integer", "minimum": 1, "maximum": _MAX_PAGE, "default": _DEFAULT_PAGE},
        "cursor": {"type": "string", "maxLength": 64,
                   "description": "The `next` value of the previous page."},
    },
}


def _json(data: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> web.Response:
    # backslashreplace: whatever a client managed to put in a string, the
    # answer stays valid UTF-8.
    return web.Response(body=_dumps(data).encode("utf-8", "backslashreplace"), status=status,
                        headers=headers, content_type="application/json")


async def _json_body(request: web.Request) -> Any:
    limit = request.app[CONFIG].max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"the body is {request.content_length} bytes; the limit is {limit}",
                              details={"limit": limit})
    # Read at most limit + 1 bytes whatever the framing (chunked bodies have no length).
    chunks, size = [], 0
    while chunk := await request.content.readany():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"the body is over the limit of {limit} bytes",
                                  details={"limit": limit})
        chunks.append(chunk)
    raw = b"".join(chunks)
    if len(raw) > _BIG_BODY:  # parsed beside the event loop, which keeps answering
        return await asyncio.to_thread(_parse_body, raw)
    return _parse_body(raw)


_BIG_BODY = 256 * 1024  # bodies larger than this are parsed and checked in a worker thread


def _parse_body(raw: bytes) -> Any:
    if not raw.strip():
        raise BadRequest("the request body is empty; send a JSON object", code="invalid_json")
    try:
        body = _loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise BadRequest("the request body is not UTF-8", code="invalid_json") from None
    except ValueError as exc:
        raise BadRequest(f"the request body is not valid JSON: {exc}", code="invalid_json") from None
    # What json.loads survives, ComfyUI may not: its queue deep-copies every
    # prompt, and a value nested a few hundred levels kills its worker for good.
    if _nesting_exceeds(body, _MAX_BODY_NESTING):
        raise BadRequest(f"the request body is nested deeper than {_MAX_BODY_NESTING} levels",
                         code="invalid_json", details={"limit": _MAX_BODY_NESTING})
    return body


def _query(request: web.Request, schema: Mapping[str, Any]) -> dict[str, Any]:
    """Typed query parameters, validated by the same schema /openapi.json shows."""
    values: dict[str, Any] = {}
    for name, prop in schema["properties"].items():
        raw = request.query.get(name)
        if raw is None:
            if "default" in prop:
                values[name] = prop["default"]
            continue
        if prop.get("type") in ("integer", "number"):
            try:
                values[name] = int(raw) if prop["type"] == "integer" else _finite_float(raw)
            except ValueError:
                raise BadRequest(f"{name}: must be {'an integer' if prop['type'] == 'integer' else 'a number'}",
                                 details={"field": name}) from None
        else:
            values[name] = raw
    _Schema.validate(schema, values)
    return values


def _job_view(job: Job, position: int | None = None, *, admin: bool = True) -> dict[str, Any]:
    """A job as the API shows it: the seed's fields, then what comfymgr adds
    (who submitted it only to admin keys)."""
    if job.state in (JobState.DISPATCHING, JobState.SUBMITTED):
        position = 0  # handed to ComfyUI, about to start
    return {
        "workflowId": job.id,
        "status": job.status,
        "priority": job.priority.label,
        "queuePosition": position,
        "progress": round(job.progress, 1),
        "currentNode": job.current_node,
        "createdAt": job.created_at,
        "startTime": job.started_at,
        "completionTime": job.completed_at,
        "outputs": [{**item, "workflowId": job.id} for item in (job.outputs or [])],
        "error": job.error,
        "state": job.state.value,
        "gpu": job.target,
        "backend": job.backend,
        "promptId": job.prompt_id,
        "attempts": job.attempts,
        "timeout": job.timeout_s,
        "cancelRequested": job.cancel_requested_at is not None,
    } | ({"submittedBy": job.submitted_by} if admin else {})


###############################################################################
# http middlewares
###############################################################################
# Outermost first: metrics -> cors -> errors (the one envelope) -> rate
# limit -> auth. Every route needs X-API-Key except those in _OPEN_ROUTES.

def _route_name(request: web.Request) -> str | None:
    route = request.match_info.route
    return getattr(route, "name", None)


def _route_template(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


@web.middleware
async def _metrics_middleware(request: web.Request, handler: Callable) -> web.StreamResponse:
    started = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    finally:
        route = _route_template(request)
        method = request.method if request.method in _KNOWN_METHODS else "other"
        request.app[METRICS].count_request(route, method, status, time.perf_counter() - started)


_KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_CORS_ALLOW_HEADERS = "X-API-Key, Content-Type, Idempotency-Key, Range, If-None-Match"
_CORS_EXPOSE_HEADERS = "Location, Retry-After, ETag, Content-Length, Content-Range"


@web.middleware
async def _cors_middleware(request: web.Request, handler: Callable) -> web.StreamResponse:
    """Same-origin unless COMFYMGR_CORS_ORIGINS allows the Origin. Preflights
    are answered here, before auth: browsers never send keys with them."""
    origins = request.app[CONFIG].cors_origins
    origin = request.headers.get("Origin")
    allowed = bool(origin) and ("*" in origins or origin in origins)
    if request.method == "OPTIONS" and origin and "Access-Control-Request-Method" in request.headers:
        if not allowed:
            return _json(Forbidden(f"origin {origin} is not allowed",
                                   code="cors_forbidden").envelope(), status=403)
        return web.Response(status=204, headers={
            "Access-Control-Allow-Origin": "*" if "*" in origins else origin,
            "Access-Control-Allow-Methods": "GET, HEAD, POST, DELETE, OPTIONS",
            "Access-Control-Allow-Headers": _CORS_ALLOW_HEADERS,
            "Access-Control-Max-Age": "600",
            "Vary": "Origin",
        })
    response = await handler(request)
    if origins and not response.prepared:
        # Vary on every answer, so that a cache never hands an allowed origin
        # a copy made for another one (or for none).
        response.headers.add("Vary", "Origin")
        if allowed:
            response.headers["Access-Control-Allow-Origin"] = "*" if "*" in origins else origin
            response.headers["Access-Control-Expose-Headers"] = _CORS_EXPOSE_HEADERS
    return response


@web.middleware
async def _error_middleware(request: web.Request, handler: Callable) -> web.StreamResponse:
    """The one error envelope, for everything a client can cause; anything
    else is logged with its traceback and answered with a bare 500."""
    try:
        return await handler(request)
    except ApiError as exc:
        return _json(exc.envelope(), status=exc.status, headers=exc.headers)
    except StorageError as exc:
        error = _storage_api_error(exc)
        return _json(error.envelope(), status=error.status)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _json(_http_exception_envelope(request, exc), status=exc.status,
                     headers={k: v for k, v in exc.headers.items()
                              if k.lower() in ("allow", "retry-after")})
    except asyncio.CancelledError:
        raise
    except Exception:  # noqa: BLE001 - the last line of defence: logged, answered 500
        _log_http.exception("unhandled error in %s %s", request.method, request.path)
        return _json(ApiError("internal error; it has been logged").envelope(), status=500)


def _storage_api_error(exc: StorageError) -> ApiError:
    """What a client is told of a refusal of Storage's."""
    if isinstance(exc, JobNotFound):
        return NotFound(exc.message, code="not_found", details=exc.details)
    if isinstance(exc, NotCancellable):
        return Conflict(exc.message, code="not_cancellable", details=exc.details)
    if isinstance(exc, IdempotencyConflict):
        return UnprocessableEntity(exc.message, code="idempotency_conflict", details=exc.details)
    return Conflict(exc.message, code="invalid_transition", details=exc.details)


def _http_exception_envelope(request: web.Request, exc: web.HTTPException) -> dict[str, Any]:
    if exc.status == 404:
        err: ApiError = NotFound(f"no route for {request.method} {request.path}",
                                 details={"path": request.path})
    elif exc.status == 405:
        allowed = sorted(getattr(exc, "allowed_methods", ()) or ())
        err = MethodNotAllowed(f"{request.method} is not allowed here; use {', '.join(allowed)}",
                               details={"allowed": allowed})
    elif exc.status == 413:
        limit = request.app[CONFIG].max_body_bytes
        err = PayloadTooLarge(f"the body is over the limit of {limit} bytes",
                              details={"limit": limit})
    else:
        err = ApiError(exc.reason or "request failed", code=f"http_{exc.status}").with_status(exc.status)
    return err.envelope()


class _RateLimiter:
    """A token bucket per client address: `per_minute` requests a minute,
    bursts up to `per_minute`. Only the event loop touches it (no lock).
    Memory stays bounded: buckets that have refilled are dropped once the
    table grows past `max_clients`."""

    def __init__(self, per_minute: int, clock: Clock, max_clients: int = 10_000) -> None:
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0
        self._clock = clock
        self._max_clients = max_clients
        self._buckets: dict[str, tuple[float, float]] = {}

    def check(self, client: str) -> float | None:
        """None when the request may pass, else the seconds until it could."""
        now = self._clock()
        tokens, last = self._buckets.get(client, (self.capacity, now))
        tokens = min(self.capacity, tokens + (now - last) * self.rate)
        if tokens < 1:
            self._buckets[client] = (tokens, now)
            return (1 - tokens) / self.rate
        self._buckets[client] = (tokens - 1, now)
        if len(self._buckets) > self._max_clients:
            self._prune(now)
        return None

    def _prune(self, now: float) -> None:
        full = [c for c, (t, last) in self._buckets.items()
                if t + (now - last) * self.rate >= self.capacity]
        for client in full:
            del self._buckets[client]
        if len(self._buckets) > self._max_clients * 3 // 4:
            # Still crowded (very many active addresses): forget the longest
            # known quarter, so that pruning stays rare rather than per request.
            for client in list(self._buckets)[: len(self._buckets) // 4]:
                del self._buckets[client]


RATE_LIMITER = web.AppKey("rate_limiter", _RateLimiter)


def _client_address(request: web.Request) -> str:
    """The peer, or, when the peer is a trusted proxy, the right-most
    X-Forwarded-For address that is not itself a trusted proxy."""
    peer = request.remote or "unknown"
    trusted = request.app[CONFIG].trusted_proxies
    if not trusted or not _in_networks(peer, trusted):
        return peer
    forwarded = [a.strip() for h in request.headers.getall("X-Forwarded-For", [])
                 for a in h.split(",") if a.strip()]
    for address in reversed(forwarded):
        if not _in_networks(address, trusted):
            return address
    return forwarded[0] if forwarded else peer


def _in_networks(address: str, networks: Sequence[Any]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in net for net in networks)


@web.middleware
async def _rate_limit_middleware(request: web.Request, handler: Callable) -> web.StreamResponse:
    limiter = request.app.get(RATE_LIMITER)
    if limiter is not None and _route_name(request) not in _UNLIMITED_ROUTES:
        wait = limiter.check(_client_address(request))
        if wait is not None:
            retry_after = max(1, math.ceil(wait))
            raise RateLimited(
                f"too many requests; the limit is {request.app[CONFIG].rate_limit} a minute",
                details={"limit": request.app[CONFIG].rate_limit, "retryAfter": retry_after},
                headers={"Retry-After": str(retry_after)})
    return await handler(request)


def _authenticate(given: str | None, keys: Sequence[_Key]) -> _Principal | None:
    if not given:
        return None
    candidate = given.encode("utf-8", "surrogateescape")
    found = None
    for key in keys:  # every key compared, in constant time each
        if hmac.compare_digest(candidate, key.secret):
            found = key
    if found is None:
        return None
    return _Principal(found.name, found.admin, hashlib.sha256(candidate).digest())


@web.middleware
async def _auth_middleware(request: web.Request, handler: Callable) -> web.StreamResponse:
    if _route_name(request) not in _OPEN_ROUTES:
        request[PRINCIPAL] = _principal_or_401(request)
    return await handler(request)


def _principal_or_401(request: web.Request) -> _Principal:
    given = request.headers.get("X-API-Key")
    if given is None and _route_name(request) in _QUERY_KEY_ROUTES:
        given = request.query.get("api_key")
    principal = _authenticate(given, request.app[API_KEYS])
    if principal is None:
        raise Unauthorized("a valid X-API-Key header is required" if given is None
                           else "the API key is not valid")
    return principal


async def _expect_handler(request: web.Request) -> web.StreamResponse | None:
    """Expect: 100-continue is answered only once the key is known good, so
    that a stranger never gets to send a large body (a 401 instead)."""
    if _route_name(request) not in _OPEN_ROUTES:
        try:
            _principal_or_401(request)
        except Unauthorized as exc:
            return _json(exc.envelope(), status=exc.status)
    if request.headers.get("Expect", "").lower() != "100-continue":
        return _json(ApiError(f"Expect: {request.headers['Expect'][:100]} is not understood",
                              code="expectation_failed").with_status(417).envelope(), status=417)
    if request.version >= aiohttp.HttpVersion11:
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # the 100 is not part of the answer's size
    return None


async def _plain_server_header(request: web.Request, response: web.StreamResponse) -> None:
    """A plain Server header: no Python or aiohttp versions for scanners."""
    response.headers["Server"] = "comfymgr"



# Routes whose clients may not be able to set headers (browser WebSockets).
_QUERY_KEY_ROUTES: frozenset[str] = frozenset({"stream"})


###############################################################################
# job routes
###############################################################################
# Submit, status, cancel and list; the event stream; health, status and
# metrics.

def _refuse_ui_format(body: Any) -> None:
    """ComfyUI's saved workflow (UI format: nodes and links arrays) is not
    what it runs; say so rather than "workflow.nodes: must be an object"."""
    for where, graph in (("workflow", body.get("workflow") if isinstance(body, dict) else None),
                         ("body", body)):
        if isinstance(graph, dict) and isinstance(graph.get("nodes"), list) \
                and isinstance(graph.get("links"), list):
            raise BadRequest(f"{where}: this is a workflow in ComfyUI's UI format (it has nodes and "
                             "links); comfymgr runs the API format: in ComfyUI use Workflow > "
                             "Export (API), and send that file's content as workflow",
                             code="invalid_workflow", details={"field": where, "format": "ui"})


def _check_submit(bridge: _Bridge, queue_: _Queue, body: Any) -> str:
    """The body of a submit checked (fields, graph, what ComfyUI would
    refuse); returns the target backend."""
    _refuse_ui_format(body)
    _Schema.validate(SUBMIT_SCHEMA, body)
    target = queue_.resolve_target(body.get("gpu", "local"))
    bridge.check_workflow(body["workflow"], target)
    return target


async def _handle_submit(request: web.Request) -> web.Response:
    q = _query(request, WAIT_QUERY_SCHEMA)
    body = await _json_body(request)
    app = request.app
    queue_ = app[QUEUE]
    if request.content_length is not None and request.content_length > _BIG_BODY:
        target = await asyncio.to_thread(_check_submit, app[BRIDGE], queue_, body)
    else:
        target = _check_submit(app[BRIDGE], queue_, body)
    priority = Priority[body.get("priority", "normal").upper()]
    timeout = body.get("timeout") or app[CONFIG].job_timeout or None
    extra = {"webhook": await app[WEBHOOKS].check(body["webhook"])} if "webhook" in body else {}
    idempotency = None
    key = request.headers.get("Idempotency-Key")
    if key is not None:
        if not 1 <= len(key) <= 255 or not key.isascii() or not key.isprintable():
            raise BadRequest("Idempotency-Key: 1 to 255 printable ASCII characters",
                             details={"field": "Idempotency-Key"})
        # Scoped by the API key that sent it; the body compared as parsed JSON.
        scope = hashlib.sha256(request[PRINCIPAL].key_id + b"\0" + key.encode()).hexdigest()
        digest = hashlib.sha256(_sorted_json(body)).hexdigest()
        idempotency = (scope, digest)
    principal = request[PRINCIPAL]
    if not principal.admin:
        _check_input_references(app[INPUT_SALT], principal.name, body["workflow"])
    job_id, workflow = _new_id(), body["workflow"]
    if body.get("inputs"):
        # In hand before the 202: fetched or decoded, checked, stored.
        prepared = await _prepare_inputs(app, body["inputs"], workflow)
        files = _input_files(prepared)
        folder = _InputStore.subfolder(job_id)
        workflow = _rewrite_inputs(workflow, {name: f"{folder}/{file}" for name, file, _ in files})
        await app[INPUTS].save(job_id, [(file, data) for _, file, data in files])
        extra["inputs"] = [file for _, file, _ in files]
    try:
        job, position, replayed = await queue_.submit(
            workflow, priority, target, timeout_s=timeout, extra=extra or None,
            idempotency=idempotency, owner=principal.name, job_id=job_id)
    except BaseException:
        if "inputs" in extra:
            await app[INPUTS].remove(job_id)
        raise
    if replayed and "inputs" in extra:
        await app[INPUTS].remove(job_id)  # the original job has its own
    headers = {"Location": f"/v1/comfyui/workflow/{job.id}"}
    if replayed:
        headers["Idempotent-Replayed"] = "true"
    if q.get("wait") and not job.terminal:
        job, position = await _wait_for_end(request, job, q["wait"])
    view = await _full_view(request, job, position, include=q.get("include"))
    return _json(view, status=200 if replayed or job.terminal else 202, headers=headers)


async def _wait_for_end(request: web.Request, job: Job, seconds: float) -> tuple[Job, int | None]:
    """The job once it ended, or as it is when the wait is over (capped by
    COMFYMGR_MAX_WAIT), the client went away, or comfymgr is stopping."""
    app = request.app
    waiters = app[WAITERS]
    future = waiters.watch(job.id)
    try:
        job, position = await app[QUEUE].get(job.id)  # it may have ended meanwhile
        if not job.terminal:
            await waiters.wait(future, min(seconds, app[CONFIG].max_wait), request)
            job, position = await app[QUEUE].get(job.id)
    finally:
        waiters.forget(job.id, future)
    return job, position


class _Waiters:
    """Requests holding their answer (?wait=) until a job ends. Woken by the
    committed end events, not by polling; each costs one future."""

    _CHECK = 5.0  # how often a waiting request looks whether its client is gone

    def __init__(self) -> None:
        self._futures: dict[str, set[asyncio.Future[None]]] = {}
        self.closed = False

    def __len__(self) -> int:
        return sum(len(f) for f in self._futures.values())

    def watch(self, job_id: str) -> asyncio.Future[None]:
        future = asyncio.get_running_loop().create_future()
        if self.closed:
            future.set_result(None)
        self._futures.setdefault(job_id, set()).add(future)
        return future

    def forget(self, job_id: str, future: asyncio.Future[None]) -> None:
        found = self._futures.get(job_id)
        if found is not None:
            found.discard(future)
            if not found:
                del self._futures[job_id]

    def notify(self, events: Sequence[Event]) -> None:
        for event in events:
            if event.type in _END_EVENTS:
                for future in self._futures.get(event.job_id, ()):
                    if not future.done():
                        future.set_result(None)

    def close(self) -> None:
        """Shutdown: every waiting request answers at once, with the job as it is."""
        self.closed = True
        for futures in self._futures.values():
            for future in futures:
                if not future.done():
                    future.set_result(None)

    async def wait(self, future: asyncio.Future[None], seconds: float, request: web.Request) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while not future.done():
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            await asyncio.wait({future}, timeout=min(remaining, self._CHECK))
            if request.transport is None or request.transport.is_closing():
                return  # the client went away: nothing to answer


_END_EVENTS = frozenset({"workflow:completed", "workflow:error", "workflow:cancelled"})
WAITERS = web.AppKey("waiters", _Waiters)


_DATA_URI = re.compile(r"^data:([A-Za-z0-9.+-]+/[A-Za-z0-9.+-]+)?((?:;[A-Za-z0-9=.+-]+)*),")


async def _prepare_inputs(app: web.Application, spec: Mapping[str, str],
                          workflow: Mapping[str, Any]) -> list[tuple[str, bytes, str]]:
    """(name, bytes, file extension) of each inline input, decoded or fetched
    and checked to be an image. An ApiError names the input it is about."""
    mentioned = {value for node in workflow.values() for value in node["inputs"].values()
                 if isinstance(value, str)}
    prepared = []
    for name, value in spec.items():
        field = f"inputs.{name}"
        if name not in mentioned:
            raise BadRequest(f"{field}: no input of the workflow is {name!r}; put that name where "
                             "the image goes (e.g. LoadImage's image)", code="input_not_used",
                             details={"field": field})
        if value[:8].lower().startswith(("http://", "https://")):
            data = await _fetch_input(app, field, value)
        else:
            data = await _decode_input(app, field, value)
        extension = _image_extension(data)
        if extension is None:
            raise BadRequest(f"{field}: not a PNG, JPEG, WebP, GIF, BMP or TIFF image",
                             code="invalid_image", details={"field": field})
        prepared.append((name, data, extension))
    return prepared


async def _decode_input(app: web.Application, field: str, value: str) -> bytes:
    limit = app[CONFIG].max_input_bytes
    payload = value
    if value.startswith("data:"):
        match = _DATA_URI.match(value)
        if match is None or ";base64" not in match.group(2).lower():
            raise BadRequest(f"{field}: a data: URI must be data:<type>;base64,<data>",
                             code="invalid_input", details={"field": field})
        payload = value[match.end():]
    if len(payload) * 3 // 4 > limit + 3:
        raise PayloadTooLarge(f"{field}: over the limit of {limit} bytes (COMFYMGR_MAX_INPUT_BYTES)",
                              details={"field": field, "limit": limit})

    def decode() -> bytes:
        text = "".join(payload.split())  # base64 tools wrap lines
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)

    try:
        data = await asyncio.to_thread(decode)
    except (ValueError, TypeError):
        raise BadRequest(f"{field}: neither base64, a data: URI with base64, nor an http(s) URL",
                         code="invalid_input", details={"field": field}) from None
    if len(data) > limit:
        raise PayloadTooLarge(f"{field}: over the limit of {limit} bytes (COMFYMGR_MAX_INPUT_BYTES)",
                              details={"field": field, "limit": limit})
    return data


_FETCH_REDIRECTS = 5


async def _fetch_input(app: web.Application, field: str, value: str) -> bytes:
    """GET an input URL through the outbound policy: every hop of a redirect
    checked, the size bounded while reading, the event loop never held."""
    policy, session, limit = app[POLICY], app[FETCHER], app[CONFIG].max_input_bytes
    url = await policy.check_url(value, field=field, code="input_forbidden")
    try:
        for _ in range(_FETCH_REDIRECTS + 1):
            _check_literal(policy, url)
            async with session.get(url, allow_redirects=False) as resp:
                if resp.status in (301, 302, 303, 307, 308) and "Location" in resp.headers:
                    try:
                        target = str(url.join(yarl.URL(resp.headers["Location"])))
                    except ValueError:  # what the server names is no URL at all
                        raise UnprocessableEntity(
                            f"{field}: {_redact_url(str(url))} redirected to something that is "
                            "not a URL", code="input_unavailable", details={"field": field}) from None
                    url = await policy.check_url(target, field=field, code="input_forbidden")
                    continue
                if resp.status != 200:
                    raise UnprocessableEntity(f"{field}: {_redact_url(str(url))} answered HTTP "
                                              f"{resp.status}", code="input_unavailable",
                                              details={"field": field, "status": resp.status})
                if (resp.content_length or 0) > limit:
                    raise PayloadTooLarge(f"{field}: over the limit of {limit} bytes "
                                          "(COMFYMGR_MAX_INPUT_BYTES)",
                                          details={"field": field, "limit": limit})
                data = bytearray()
                async for chunk in resp.content.iter_chunked(_CHUNK):
                    data.extend(chunk)
                    if len(data) > limit:
                        raise PayloadTooLarge(f"{field}: over the limit of {limit} bytes "
                                              "(COMFYMGR_MAX_INPUT_BYTES)",
                                              details={"field": field, "limit": limit})
                return bytes(data)
    except OutboundRefused as exc:
        _log_http.info("input %s refused at connect: %s", field, exc)
        raise BadRequest(f"{field}: {_redact_url(str(url))} is not an address comfymgr may fetch "
                         "from", code="input_forbidden", details={"field": field}) from None
    except asyncio.TimeoutError:
        raise UnprocessableEntity(f"{field}: fetching {_redact_url(str(url))} timed out",
                                  code="input_unavailable", details={"field": field}) from None
    except (aiohttp.ClientError, OSError) as exc:
        _log_http.info("input %s: fetching %s failed: %s", field, _redact_url(str(url)), exc)
        raise UnprocessableEntity(f"{field}: {_redact_url(str(url))} could not be fetched",
                                  code="input_unavailable", details={"field": field}) from None
    raise UnprocessableEntity(f"{field}: more than {_FETCH_REDIRECTS} redirects",
                              code="input_unavailable", details={"field": field})


def _image_extension(data: bytes) -> str | None:
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return ".webp"
    return next((ext for signature, ext in _IMAGE_SIGNATURES if data.startswith(signature)), None)


def _input_files(prepared: Sequence[tuple[str, bytes, str]]) -> list[tuple[str, str, bytes]]:
    """(input name, file name, bytes): file names from the input names, made
    safe and distinct."""
    files: list[tuple[str, str, bytes]] = []
    for name, data, extension in prepared:
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._")[:60] or "input"
        file, n = stem + extension, 1
        while any(file == f for _, f, _ in files):
            n += 1
            file = f"{stem}-{n}{extension}"
        files.append((name, file, data))
    return files


def _rewrite_inputs(workflow: Mapping[str, Any], names: Mapping[str, str]) -> dict[str, Any]:
    """The workflow with every string input equal to an input's name
    replaced by where that input is stored."""
    return {node_id: {**node, "inputs": {k: names.get(v, v) if isinstance(v, str) else v
                                         for k, v in node["inputs"].items()}}
            for node_id, node in workflow.items()}


async def _full_view(request: web.Request, job: Job, position: int | None, *,
                     include: str | None = None) -> dict[str, Any]:
    """The job view of GET, with its webhook deliveries, for admins who
    submitted it, and with include=data its outputs' bytes."""
    app = request.app
    view = _job_view(job, position, admin=request[PRINCIPAL].admin)
    if include == "data" and view["outputs"]:
        view["outputs"] = await app[FILES].with_data(job, view["outputs"], app[BRIDGE].backends)
    webhook = job.extra.get("webhook")
    if webhook:
        rows = await app[DB].read(Storage.deliveries_for, job.id)
        view["webhook"] = {**webhook, "url": _redact_url(webhook["url"]), "deliveries": [
            {"id": r["id"], "event": r["event_type"], "state": r["state"], "attempts": r["attempts"],
             "lastStatus": r["last_status"], "lastError": r["last_error"],
             "nextAttemptAt": r["next_at"] if r["state"] == "pending" else None,
             "deliveredAt": r["delivered_at"]} for r in rows]}
    return view


async def _handle_get(request: web.Request) -> web.Response:
    q = _query(request, WAIT_QUERY_SCHEMA)
    job, position = await request.app[QUEUE].get(request.match_info["id"], request[PRINCIPAL].owner)
    if q.get("wait") and not job.terminal:
        job, position = await _wait_for_end(request, job, q["wait"])
    return _json(await _full_view(request, job, position, include=q.get("include")))


async def _handle_cancel(request: web.Request) -> web.Response:
    job = await request.app[QUEUE].cancel(request.match_info["id"], request[PRINCIPAL].owner)
    if not job.terminal:
        await request.app[BRIDGE].request_cancel(job)
        # A job still waiting in ComfyUI's queue is removed from it at once.
        job, _ = await request.app[QUEUE].get(job.id)
        if job.terminal and job.state is not JobState.CANCELLED:
            # It ended on its own before the cancel reached it: the answer to
            # cancelling a finished job, not a 200 that reads as "cancelled".
            raise Conflict(f"workflow {job.id} already {job.status}; there is nothing to cancel",
                           code="not_cancellable", details={"workflowId": job.id, "status": job.status})
    if job.terminal:
        return _json({"workflowId": job.id, "status": job.status})
    return _json({"workflowId": job.id, "status": job.status, "cancelRequested": True,
                  "message": "the job is with ComfyUI; it is being interrupted"}, status=202)


async def _handle_preview(request: web.Request) -> web.Response:
    """The latest preview image of a running job, from memory."""
    job, _ = await request.app[QUEUE].get(request.match_info["id"], request[PRINCIPAL].owner)
    preview = request.app[BRIDGE].preview(job)
    if preview is None:
        raise NotFound(f"workflow {job.id} has no preview now (previews exist while a job runs a "
                       "node that sends them, such as a sampler)", code="no_preview",
                       details={"workflowId": job.id, "status": job.status})
    etag = f'"{job.prompt_id}-{preview.counter}"'
    headers = {"ETag": etag, "Cache-Control": "no-store", "X-Content-Type-Options": "nosniff",
               "X-Preview-Counter": str(preview.counter)}
    if preview.node_id is not None:
        headers["X-Preview-Node"] = preview.node_id
    if etag in [t.strip().removeprefix("W/") for t in request.headers.get("If-None-Match", "").split(",")]:
        return web.Response(status=304, headers=headers)
    return web.Response(body=preview.image, content_type=preview.content_type, headers=headers)


async def _handle_list(request: web.Request) -> web.Response:
    q = _query(request, LIST_QUERY_SCHEMA)
    before = None
    if "cursor" in q:
        try:
            before = int(_unb64url(q["cursor"]).decode())
            if not 0 < before < 2**63:
                raise ValueError
        except (ValueError, UnicodeDecodeError):
            raise BadRequest("cursor: not a cursor this API returned",
                             details={"field": "cursor"}) from None
    jobs, positions = await request.app[QUEUE].list(
        statuses=[q["status"]] if "status" in q else [],
        priority=Priority[q["priority"].upper()] if "priority" in q else None,
        before=before, limit=q["limit"], owner=request[PRINCIPAL].owner)
    next_cursor = _b64url(str(jobs[-1].n).encode()) if len(jobs) == q["limit"] else None
    admin = request[PRINCIPAL].admin
    return _json({"workflows": [_job_view(j, positions.get(j.id), admin=admin) for j in jobs],
                  "next": next_cursor, "limit": q["limit"]})


STREAM_QUERY_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        # Job ids and keys are ASCII: said here, a URL that carries them stays
        # under the HTTP layer's 8 KiB request line (over it: a plain-text 400).
        "workflowId": {"type": "string", "maxLength": 64 * 100, "pattern": "^[A-Za-z0-9_.,-]*$",
                       "description": "Follow only these workflows (comma-separated)."},
        "since": {"type": "integer", "minimum": 0, "maximum": _MAX_SEQ,
                  "description": "Replay stored events after this seq first."},
        "api_key": {"type": "string", "maxLength": 1024, "pattern": "^[ -~]*$",
                    "description": "For clients that cannot set X-API-Key."},
        "previews": {"type": "string", "enum": ["true", "false"], "default": "true",
                     "description": "false: no workflow:preview messages on this socket."},
    },
}


async def _handle_stream(request: web.Request) -> web.StreamResponse:
    q = _query(request, STREAM_QUERY_SCHEMA)
    ids = [i for raw in request.query.getall("workflowId", []) for i in raw.split(",") if i]
    if len(ids) > _MAX_SUBSCRIPTIONS:
        raise BadRequest(f"workflowId: at most {_MAX_SUBSCRIPTIONS} workflows",
                         details={"field": "workflowId"})
    hub = request.app[HUB]
    config = request.app[CONFIG]
    ws = web.WebSocketResponse(heartbeat=config.heartbeat or None, max_msg_size=64 * 1024)
    if not ws.can_prepare(request).ok:
        raise ApiError("this is a WebSocket endpoint; connect with an Upgrade request "
                       "(e.g. websocat)", code="upgrade_required", headers={"Upgrade": "websocket"}
                       ).with_status(426)
    if len(hub.subscribers) >= config.ws_max_clients:
        raise ServiceUnavailable(f"already {config.ws_max_clients} stream clients; try later",
                                 code="too_many_clients", headers={"Retry-After": "5"})
    await ws.prepare(request)
    sub = _Subscriber(ws, hub, _client_address(request), request[PRINCIPAL].owner)
    sub.previews = q["previews"] == "true"
    await hub.serve(sub, since=q.get("since"), workflow_ids=ids)
    return ws


async def _handle_health(request: web.Request) -> web.Response:
    try:
        await asyncio.wait_for(request.app[DB].read(Storage.ping), timeout=2)
    except (asyncio.TimeoutError, ApiError, sqlite3.Error) as exc:
        raise ServiceUnavailable("the database is not answering", code="unhealthy",
                                 details={"database": str(exc) or type(exc).__name__}) from None
    return _json({"status": "ok", "version": __version__, "database": "ok"})


async def _handle_status(request: web.Request) -> web.Response:
    app = request.app
    principal = request[PRINCIPAL]
    stats = await app[DB].read(Storage.stats, principal.owner)
    counts = stats["counts"]
    by_status = dict.fromkeys(PUBLIC_STATUSES, 0)
    by_priority = {p.label: dict.fromkeys(PUBLIC_STATUSES, 0) for p in Priority}
    for (state, priority), n in counts.items():
        by_status[_PUBLIC_STATUS[state]] += n
        by_priority[priority.label][_PUBLIC_STATUS[state]] += n
    if not principal.admin:  # a client sees its own queue, nothing of the box
        return _json({"version": __version__, "key": principal.name,
                      "queue": {"byStatus": by_status, "byPriority": by_priority}})
    size, version = stats["size_bytes"], stats["schema_version"]
    now = app[CLOCK]()
    return _json({
        "version": __version__,
        "startedAt": _ms(app[STARTED_AT]),
        "uptimeSeconds": round(now - app[STARTED_AT], 3),
        "queue": {"byStatus": by_status, "byPriority": by_priority},
        "database": {"path": str(app[DB].path), "sizeBytes": size, "schemaVersion": version,
                     "lastError": app[DB].last_error or app[DB].write_error},
        "runtime": {"python": sys.version.split()[0],
                    "eventLoop": type(asyncio.get_running_loop()).__module__.split(".")[0],
                    "json": "orjson" if orjson is not None else "json"},
        "backends": [b.view() for b in app[BRIDGE].backends.values()],
        "tasks": app[SUPERVISOR].view(),
        "gpu": app[GPUS].view(_gpu_users(app)),
        "stream": {"clients": len(app[HUB].subscribers), "latestSeq": app[HUB].latest_seq},
        "files": {**{t: app[FILES].disk.get(t) for t in ("output", "temp")},
                  "filesystems": app[FILES].filesystems,
                  "retentionDays": app[CONFIG].retention_days or None},
    })


def _gpu_users(app: web.Application) -> dict[int, list[str]]:
    """Physical GPU index -> the backends configured to run on it."""
    users: dict[int, list[str]] = {}
    for backend in app[BRIDGE].backends.values():
        if backend.spec.gpu_index is not None:
            users.setdefault(backend.spec.gpu_index, []).append(backend.name)
    return users


async def _handle_metrics(request: web.Request) -> web.Response:
    app = request.app
    metrics = app[METRICS]
    stats = await app[DB].read(Storage.stats)
    counts, oldest, size = stats["counts"], stats["oldest_queued_at"], stats["size_bytes"]
    # "queued" as the API shows it: waiting here, or handed to ComfyUI and not started.
    queued = {p: sum(counts.get((state, p), 0) for state in _PUBLIC_QUEUED) for p in Priority}
    metrics.queue_length.set(sum(queued.values()))
    for p, n in queued.items():
        metrics.queue_by_priority.labels(p.label).set(n)
    metrics.queue_oldest_age.set(max(0.0, app[CLOCK]() - oldest / 1000) if oldest else 0.0)
    metrics.database_size.set(size)
    return web.Response(body=metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})


###############################################################################
# file routes
###############################################################################
# The HTTP side of the files section: model and output listings, downloads
# (Range, ETag, 304) from descriptors the files section opened safely, and
# input uploads.

MODELS_QUERY_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"type": {"type": "string", "enum": list(MODEL_TYPES),
                            "description": "One model type; all when absent."}},
}
OUTPUTS_QUERY_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "workflowId": {"type": "string", "maxLength": 64, "description": "Only this job's files."},
        "type": {"type": "string", "enum": ["output", "temp"], "default": "output"},
        "limit": {"type": "integer", "minimum": 1, "maximum": _MAX_PAGE, "default": _DEFAULT_PAGE},
        # base64url, as _cursor writes it: also what keeps a URL that carries
        # one under the HTTP layer's 8 KiB request line
        "cursor": {"type": "string", "maxLength": 1200, "pattern": "^[A-Za-z0-9_-]*$",
                   "description": "The `next` value of the previous page."},
    },
}
OUTPUT_QUERY_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"type": {"type": "string", "enum": ["output", "temp"], "default": "output"}},
}
UPLOAD_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["image"],
    "additionalProperties": False,  # _handle_upload refuses any other part
    "properties": {
        "image": {"type": "string", "format": "binary", "description": "The image file."},
        "subfolder": {"type": "string", "maxLength": 200, "default": ""},
        "overwrite": {"type": "string", "enum": ["true", "false"], "default": "false"},
        "gpu": {"type": "string", "default": "local",
                "description": "Where to upload when COMFYUI_INPUTS is not set: local/any (every "
                               "backend) or one backend's name."},
    },
}


async def _handle_models(request: web.Request) -> web.Response:
    q = _query(request, MODELS_QUERY_SCHEMA)
    types = [q["type"]] if "type" in q else list(MODEL_TYPES)
    backends = list(request.app[BRIDGE].backends.values())
    return _json(await request.app[FILES].models(types, backends))


def _cursor(value: tuple[Any, ...] | None) -> str | None:
    return _b64url(_dumps(list(value)).encode()) if value is not None else None


def _uncursor(text: str, shape: tuple[type, ...]) -> tuple[Any, ...]:
    try:
        value = _loads(_unb64url(text).decode())
        if isinstance(value, list) and len(value) == len(shape) and all(
                isinstance(v, t) and not isinstance(v, bool) for v, t in zip(value, shape)):
            return tuple(value)
    except (ValueError, UnicodeDecodeError):
        pass
    raise BadRequest("cursor: not a cursor this API returned", details={"field": "cursor"})


async def _handle_outputs(request: web.Request) -> web.Response:
    q = _query(request, OUTPUTS_QUERY_SCHEMA)
    files = request.app[FILES]
    owner = request[PRINCIPAL].owner
    if "workflowId" in q:
        job, _ = await request.app[QUEUE].get(q["workflowId"], owner)
        items = await files.job_outputs(job)
        if "type" in request.query:
            items = [i for i in items if i["type"] == q["type"]]
        start = 0
        if "cursor" in q:
            start = _uncursor(q["cursor"], (int,))[0]
        page = items[start:start + q["limit"]]
        more = start + q["limit"] < len(items)
        return _json({"outputs": page, "next": _cursor((start + q["limit"],)) if more else None})
    after = _uncursor(q["cursor"], (int, str)) if "cursor" in q else None
    items, last = await files.list_outputs(q["type"], limit=q["limit"], after=after, owner=owner)
    return _json({"outputs": items, "next": _cursor(last)})


async def _handle_output(request: web.Request) -> web.StreamResponse:
    q = _query(request, OUTPUT_QUERY_SCHEMA)
    rel = request.match_info["path"]
    owner = request[PRINCIPAL].owner
    if owner is not None:  # a client key downloads only what its own jobs made
        _check_rel_path(rel)
        if not await request.app[DB].read(Storage.outputs, q["type"], paths=[rel], owner=owner):
            raise NotFound("no such file", details={"path": rel})
    if request.app[FILES].roots.get(q["type"]) is None:
        return await _proxy_output(request, q["type"], rel)
    fd, st, real = await request.app[FILES].open(q["type"], rel)
    try:
        return await _serve_file(request, fd, st, os.path.basename(real))
    finally:
        os.close(fd)


_PROXIED_REQUEST_HEADERS = ("Range", "If-Range", "If-None-Match", "If-Modified-Since")
_PROXIED_ANSWER_HEADERS = ("ETag", "Last-Modified", "Content-Range", "Accept-Ranges")


async def _proxy_output(request: web.Request, type_: str, rel: str) -> web.StreamResponse:
    """No output folder of comfymgr's own: the file comes from the backend
    that produced it (ComfyUI's /view), streamed, with Range and
    conditional requests passed through and comfymgr's own headers."""
    _check_rel_path(rel)
    app = request.app
    owner = (await app[DB].read(Storage.outputs, type_, paths=[rel])).get(rel)
    job = await app[DB].read(Storage.get, owner) if owner else None
    backend = app[BRIDGE].backends.get(job.backend or "") if job is not None else None
    if backend is None:
        raise NotFound("no such file", details={"path": rel})
    subfolder, _, filename = rel.rpartition("/")
    forward = {h: request.headers[h] for h in _PROXIED_REQUEST_HEADERS if h in request.headers}
    try:
        async with backend.client.view(filename, subfolder, type_, method=request.method,
                                       headers=forward) as upstream:
            if upstream.status == 404:
                raise NotFound("no such file", details={"path": rel})
            if upstream.status == 416:
                size = upstream.headers.get("Content-Range", "").rpartition("/")[2]
                raise ApiError(f"the range {request.headers.get('Range')} is outside the file",
                               code="range_not_satisfiable", headers={"Content-Range": f"bytes */{size}"},
                               details={"size": int(size) if size.isdigit() else None}).with_status(416)
            if upstream.status not in (200, 206, 304):
                raise BackendError(f"GET /view: HTTP {upstream.status}")
            headers = _file_headers(filename)
            headers.update((h, upstream.headers[h]) for h in _PROXIED_ANSWER_HEADERS
                           if h in upstream.headers)
            if upstream.status == 304:
                return web.Response(status=304, headers=headers)
            response = web.StreamResponse(status=upstream.status, headers=headers)
            response.content_type = mimetypes.guess_type(filename)[0] or "application/octet-stream"
            if upstream.content_length is not None:
                response.content_length = upstream.content_length
            await response.prepare(request)
            if request.method != "HEAD":
                try:
                    async for chunk in upstream.content.iter_chunked(_CHUNK):
                        await response.write(chunk)
                except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                    _log_http.warning("output %s from %s cut short: %s", rel, backend.name, exc)
                    return response  # the client sees a short body against Content-Length
            await response.write_eof()
            return response
    except BackendError as exc:
        _log_http.warning("output %s from backend %s: %s", rel, backend.name, exc)
        raise ServiceUnavailable(f"ComfyUI {backend.name}, which holds this file, did not serve it; "
                                 "try again", code="backend_unavailable",
                                 details={"backend": backend.name}) from None


def _file_headers(name: str) -> dict[str, str]:
    """What every file download answers with, whatever serves it."""
    return {
        "Cache-Control": "private, no-cache",
        "X-Content-Type-Options": "nosniff",
        # An SVG or HTML output must never run script in comfymgr's origin.
        "Content-Security-Policy": "default-src 'none'; img-src 'self'; media-src 'self'; sandbox",
        "Content-Disposition": f"inline; filename*=UTF-8''{_quote(name)}",
    }


def _parse_range(header: str, size: int) -> tuple[int, int] | None:
    """One `bytes=` range as (start, end inclusive); None to serve the whole
    file (no range, or several); ValueError when it cannot be satisfied."""
    unit, _, spec = header.partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first, dash, last = spec.strip().partition("-")
    if not dash:
        return None
    try:
        if first == "":
            length = int(last)
            if length <= 0:
                raise ValueError
            return max(0, size - length), size - 1
        start = int(first)
        end = int(last) if last else size - 1
    except ValueError:
        return None
    if start >= size or start < 0 or end < start:
        raise ValueError("unsatisfiable")
    return start, min(end, size - 1)


async def _serve_file(request: web.Request, fd: int, st: os.stat_result, name: str) -> web.StreamResponse:
    etag = f'"{st.st_mtime_ns:x}-{st.st_size:x}"'
    headers = {"ETag": etag, "Last-Modified": email.utils.formatdate(st.st_mtime, usegmt=True),
               "Accept-Ranges": "bytes", **_file_headers(name)}
    match = request.headers.get("If-None-Match")
    if match is not None:
        if match.strip() == "*" or etag in [t.strip().removeprefix("W/") for t in match.split(",")]:
            return web.Response(status=304, headers=headers)
    elif "If-Modified-Since" in request.headers:
        since = email.utils.parsedate_to_datetime(request.headers["If-Modified-Since"]) \
            if _http_date_ok(request.headers["If-Modified-Since"]) else None
        if since is not None and int(st.st_mtime) <= since.timestamp():
            return web.Response(status=304, headers=headers)
    start, end, status = 0, st.st_size - 1, 200
    range_header = request.headers.get("Range")
    if range_header and request.headers.get("If-Range", etag) == etag:
        try:
            chosen = _parse_range(range_header, st.st_size)
        except ValueError:
            raise ApiError(f"the range {range_header} is outside the file ({st.st_size} bytes)",
                           code="range_not_satisfiable", details={"size": st.st_size},
                           headers={"Content-Range": f"bytes */{st.st_size}"}).with_status(416) from None
        if chosen is not None:
            start, end = chosen
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{st.st_size}"
    response = web.StreamResponse(status=status, headers=headers)
    response.content_type = mimetypes.guess_type(name)[0] or "application/octet-stream"
    response.content_length = end - start + 1
    await response.prepare(request)
    if request.method != "HEAD":
        files = request.app[FILES]
        offset = start
        while offset <= end:
            chunk = await files.run(os.pread, fd, min(_CHUNK, end - offset + 1), offset)
            if not chunk:
                break
            await response.write(chunk)
            offset += len(chunk)
    await response.write_eof()
    return response




def _quote(name: str) -> str:
    return urllib.parse.quote(name, safe="")


def _sniff_image(data: bytes) -> bool:
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return True
    return any(data.startswith(signature) for signature, _ in _IMAGE_SIGNATURES)


async def _handle_upload(request: web.Request) -> web.Response:
    """Multipart upload of an input image for LoadImage."""
    config = request.app[CONFIG]
    if request.content_type != "multipart/form-data":
        raise ApiError("send multipart/form-data with an `image` file field",
                       code="unsupported_media_type").with_status(415)
    limit = config.max_upload_bytes
    if request.content_length is not None and request.content_length > limit + 64 * 1024:
        raise PayloadTooLarge(f"the upload is over the limit of {limit} bytes", details={"limit": limit})
    fields: dict[str, str] = {}
    image: tuple[str, bytes] | None = None
    try:
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            if not isinstance(part, aiohttp.BodyPartReader):
                raise BadRequest("nested multipart is not accepted")
            if part.name == "image":
                data = bytearray()
                while chunk := await part.read_chunk(_CHUNK):
                    data.extend(chunk)
                    if len(data) > limit:
                        raise PayloadTooLarge(f"the image is over the limit of {limit} bytes",
                                              details={"limit": limit})
                image = (part.filename or "", bytes(data))
            elif part.name in UPLOAD_SCHEMA["properties"]:
                value = await part.read(decode=True)
                if len(value) > 1024:
                    raise BadRequest(f"{part.name}: too long", details={"field": part.name})
                fields[part.name] = value.decode("utf-8", "replace")
            else:
                raise BadRequest(f"{part.name}: is not a known field", details={"field": part.name})
    # HttpProcessingError: a part whose header lines are not headers at all
    # (aiohttp's parser raises it, not a ValueError).
    except (ValueError, AssertionError, aiohttp.ClientPayloadError,
            aiohttp.http_exceptions.HttpProcessingError) as exc:
        raise BadRequest(f"the multipart body cannot be read: {exc}") from None
    if image is None:
        raise BadRequest("image: is required", details={"field": "image"})
    _Schema.validate(UPLOAD_SCHEMA, {**fields, "image": image[0]})
    # Some clients (aiohttp's among them) percent-encode the part's file name.
    name = _safe_name(urllib.parse.unquote(image[0]) or "upload.png", what="image")
    if os.path.splitext(name)[1].lower() not in _IMAGE_EXTENSIONS:
        raise BadRequest(f"image: {name} is not an image file name "
                         f"({', '.join(sorted(_IMAGE_EXTENSIONS))})", details={"field": "image"})
    if not _sniff_image(image[1]):
        raise BadRequest("image: the file is not a PNG, JPEG, WebP, GIF, BMP or TIFF image",
                         code="invalid_image", details={"field": "image"})
    parts = [_safe_name(p, what="subfolder")
             for p in fields.get("subfolder", "").replace("\\", "/").split("/") if p.strip()]
    principal = request[PRINCIPAL]
    if not principal.admin:  # a client key's uploads live in its own folder
        parts.insert(0, _client_input_folder(request.app[INPUT_SALT], principal.name))
    subfolder = "/".join(parts)
    overwrite = fields.get("overwrite", "false") == "true"
    target = request.app[QUEUE].resolve_target(fields.get("gpu", "local"))
    bridge = request.app[BRIDGE]
    backends = list(bridge.backends.values()) if target == TARGET_ANY else [bridge.backends[target]]
    stored = await request.app[FILES].store_input(name, image[1], subfolder, overwrite, backends)
    value = f"{stored['subfolder']}/{stored['name']}" if stored["subfolder"] else stored["name"]
    return _json({**stored, "workflowValue": value}, status=201)


###############################################################################
# routes
###############################################################################
# The route table: create_app() registers it and /openapi.json is generated
# from it, with the schemas the handlers validate with.

@dataclasses.dataclass(frozen=True)
class _Route:
    """One line of the route table; /openapi.json is generated from it."""

    method: str
    path: str
    handler: Callable[[web.Request], Any]
    name: str
    summary: str
    tag: str
    body: Mapping[str, Any] | None = None
    query: Mapping[str, Any] | None = None
    responses: Mapping[int, str] = dataclasses.field(default_factory=dict)
    response_schema: str | None = None  # a components/schemas name for the 2xx body
    body_type: str = "application/json"


def _routes() -> list[_Route]:
    r = _Route
    return [
        r("POST", "/v1/comfyui/workflow", _handle_submit, "submit", "Submit a workflow", "jobs",
          body=SUBMIT_SCHEMA, query=WAIT_QUERY_SCHEMA, response_schema="Job",
          responses={200: "With wait: the job, ended; or an Idempotency-Key replay",
                     202: "Queued; the job as GET shows it", 400: "Invalid JSON or request",
                     413: "Body (or an inline input) over the limit",
                     422: "An input URL could not be fetched"}),
        r("GET", "/v1/comfyui/workflow/{id}", _handle_get, "job", "Get a job's status", "jobs",
          query=WAIT_QUERY_SCHEMA, response_schema="Job",
          responses={200: "The job (with wait: once it ended, or when the wait is over)",
                     404: "No such job"}),
        r("DELETE", "/v1/comfyui/workflow/{id}", _handle_cancel, "cancel", "Cancel a job", "jobs",
          response_schema="CancelResult",
          responses={200: "Cancelled (it was queued)", 202: "Being interrupted on ComfyUI",
                     404: "No such job", 409: "Already finished"}),
        r("GET", "/v1/comfyui/workflow/{id}/preview", _handle_preview, "preview",
          "The latest preview image of a running job", "jobs",
          responses={200: "The image (image/jpeg or image/png)", 304: "Not modified",
                     404: "No such job, or no preview now (no_preview)"}),
        r("GET", "/v1/comfyui/workflows", _handle_list, "jobs", "List jobs, newest first", "jobs",
          query=LIST_QUERY_SCHEMA, response_schema="JobList",
          responses={200: "A page of jobs", 400: "Bad query parameter"}),
        r("GET", "/v1/comfyui/models", _handle_models, "models", "List models", "files",
          query=MODELS_QUERY_SCHEMA, response_schema="ModelList",
          responses={200: "Models and the state of each folder", 400: "Bad query parameter"}),
        r("GET", "/v1/comfyui/outputs", _handle_outputs, "outputs", "List output files, newest first",
          "files", query=OUTPUTS_QUERY_SCHEMA, response_schema="OutputList",
          responses={200: "A page of files", 400: "Bad query parameter",
                     404: "No such job, or no output folder configured"}),
        r("GET", "/v1/comfyui/output/{path:.+}", _handle_output, "output", "Download an output file",
          "files", query=OUTPUT_QUERY_SCHEMA,
          responses={200: "The file", 206: "Part of the file (Range)", 304: "Not modified",
                     400: "A path that is never a file name", 404: "No such file",
                     416: "Range outside the file"}),
        r("POST", "/v1/comfyui/inputs", _handle_upload, "inputs", "Upload an input image for LoadImage",
          "files", body=UPLOAD_SCHEMA, body_type="multipart/form-data", response_schema="Upload",
          responses={201: "Stored; put workflowValue in LoadImage's image input",
                     400: "Not an image, or bad fields", 413: "Over COMFYMGR_MAX_UPLOAD_BYTES",
                     415: "Not multipart/form-data", 503: "ComfyUI did not take the upload"}),
        r("GET", "/v1/comfyui/stream", _handle_stream, "stream",
          "Event stream (WebSocket): workflow:queued|started|progress|completed|cancelled|error",
          "stream", query=STREAM_QUERY_SCHEMA,
          responses={101: "Switching to the WebSocket protocol", 400: "Bad query parameter",
                     426: "Not a WebSocket upgrade request", 503: "Too many stream clients"}),
        r("GET", "/health", _handle_health, "health", "Liveness and database check", "service",
          response_schema="Health", responses={200: "Healthy", 503: "Database not answering"}),
        r("GET", "/v1/status", _handle_status, "status", "Service, queue and database status",
          "service", response_schema="Status", responses={200: "Status"}),
        r("GET", "/metrics", _handle_metrics, "metrics", "Prometheus metrics", "service",
          responses={200: "Prometheus text format"}),
    ]


###############################################################################
# openapi
###############################################################################
# /openapi.json (OpenAPI 3.1) is generated from the route table and from the
# very schemas the handlers validate with. /docs is Swagger UI served from the
# swagger-ui-bundle package's files: no CDN, works on a box with no internet.

_ERROR_SCHEMA = {
    "type": "object",
    "required": ["error", "message", "statusCode", "details"],
    "properties": {
        "error": {"type": "string", "description": "Stable machine-readable code."},
        "message": {"type": "string"},
        "statusCode": {"type": "integer"},
        "details": {"type": "object"},
    },
}
_NULLABLE_INT = {"type": ["integer", "null"]}
_NULLABLE_STR = {"type": ["string", "null"]}
# What _check_rel_path lets through, as a pattern: "/"-separated parts, none
# empty, "." or "..", without NUL or backslash. Else 400 invalid_path.
_REL_PATH_PART = r"(?:[^/\\\x00.][^/\\\x00]*|\.[^/\\\x00.][^/\\\x00]*|\.\.[^/\\\x00]+)"
_PATH_PARAM_SCHEMAS: dict[tuple[str, str], dict[str, Any]] = {
    ("output", "path"): {"type": "string", "pattern": rf"^{_REL_PATH_PART}(?:/{_REL_PATH_PART})*$"},
}
_OUTPUT_SCHEMA = {
    "type": "object",
    "required": ["filename", "type", "url"],
    "properties": {
        "filename": {"type": "string"}, "subfolder": {"type": "string"},
        "type": {"type": "string", "enum": ["output", "temp", "input"]},
        "nodeId": {"type": "string"}, "workflowId": {"type": "string"},
        "kind": {"type": "string", "description": "What ComfyUI listed it under: images, gifs, audio, ..."},
        "url": {"type": "string"},
        "data": {"type": "string", "contentEncoding": "base64",
                 "description": "With include=data: the file's bytes."},
        "contentType": {"type": "string", "description": "With include=data: the file's type."},
        "dataOmitted": {"type": "string", "enum": ["too_large", "missing", "unavailable"],
                        "description": "With include=data: why data is absent (over "
                                       "COMFYMGR_INLINE_MAX_BYTES, gone, ComfyUI unreachable)."},
    },
}
_JOB_SCHEMA = {
    "type": "object",
    "required": ["workflowId", "status", "priority", "queuePosition", "progress", "createdAt",
                 "startTime", "completionTime", "outputs", "error", "state"],
    "properties": {
        "workflowId": {"type": "string", "format": "uuid"},
        "status": {"type": "string", "enum": list(PUBLIC_STATUSES)},
        "priority": {"type": "string", "enum": list(PRIORITY_NAMES)},
        "queuePosition": {**_NULLABLE_INT, "description": "1 = dispatched next; 0 = handed to "
                          "ComfyUI, starting; null = not queued."},
        "progress": {"type": "number", "minimum": 0, "maximum": 100},
        "currentNode": _NULLABLE_STR,
        "createdAt": {"type": "integer", "description": "Epoch milliseconds."},
        "startTime": _NULLABLE_INT,
        "completionTime": _NULLABLE_INT,
        "outputs": {"type": "array", "items": _OUTPUT_SCHEMA},
        "error": {"type": ["object", "null"]},
        "state": {"type": "string", "enum": [s.value for s in JobState]},
        "gpu": {"type": "string"},
        "backend": _NULLABLE_STR,
        "promptId": _NULLABLE_STR,
        "attempts": {"type": "integer"},
        "timeout": {"type": ["number", "null"]},
        "cancelRequested": {"type": "boolean"},
        "submittedBy": {"type": "string", "description": "The key that submitted it: admin, or "
                        "a client key's name (shown to admin keys only)."},
    },
}
_COMPONENT_SCHEMAS: dict[str, Any] = {
    "Error": _ERROR_SCHEMA,
    "Job": _JOB_SCHEMA,
    "JobList": {
        "type": "object", "required": ["workflows", "next", "limit"],
        "properties": {"workflows": {"type": "array", "items": {"$ref": "#/components/schemas/Job"}},
                       "next": _NULLABLE_STR, "limit": {"type": "integer"}},
    },
    "CancelResult": {
        "type": "object", "required": ["workflowId", "status"],
        "properties": {"workflowId": {"type": "string"}, "status": {"type": "string"},
                       "cancelRequested": {"type": "boolean"}, "message": {"type": "string"}},
    },
    "Health": {
        "type": "object", "required": ["status", "version", "database"],
        "properties": {"status": {"type": "string"}, "version": {"type": "string"},
                       "database": {"type": "string"}},
    },
    "ModelList": {
        "type": "object", "required": ["models", "folders"],
        "properties": {
            "models": {"type": "array", "items": {
                "type": "object", "required": ["name", "type", "size", "hash", "modified"],
                "properties": {"name": {"type": "string"}, "type": {"type": "string"},
                               "size": _NULLABLE_INT, "hash": _NULLABLE_STR,
                               "modified": _NULLABLE_INT, "source": {"type": "string"}}}},
            "folders": {"type": "array", "items": {"type": "object"}},
        },
    },
    "OutputList": {
        "type": "object", "required": ["outputs", "next"],
        "properties": {
            "outputs": {"type": "array", "items": {
                "type": "object",
                "required": ["filename", "workflowId", "type", "size", "createdAt", "url"],
                "properties": {"filename": {"type": "string"}, "subfolder": {"type": "string"},
                               "workflowId": _NULLABLE_STR, "type": {"type": "string"},
                               "size": {"type": "integer"}, "createdAt": {"type": "integer"},
                               "url": {"type": "string"}}}},
            "next": _NULLABLE_STR,
        },
    },
    "Upload": {
        "type": "object", "required": ["name", "subfolder", "type", "workflowValue"],
        "properties": {"name": {"type": "string"}, "subfolder": {"type": "string"},
                       "type": {"type": "string"}, "workflowValue": {"type": "string"},
                       "backends": {"type": "array", "items": {"type": "string"}}},
    },
    "Status": {
        "type": "object", "required": ["version", "uptimeSeconds", "queue", "database"],
        "properties": {"version": {"type": "string"}, "startedAt": {"type": "integer"},
                       "uptimeSeconds": {"type": "number"}, "queue": {"type": "object"},
                       "database": {"type": "object"}},
    },
}


def _openapi_document(routes: Sequence[_Route]) -> dict[str, Any]:
    paths: dict[str, Any] = {}
    for route in routes:
        operation: dict[str, Any] = {"operationId": route.name, "summary": route.summary,
                                     "tags": [route.tag]}
        parameters = [{"name": name, "in": "path", "required": True,
                       "schema": _PATH_PARAM_SCHEMAS.get((route.name, name), {"type": "string"})}
                      for name in _path_params(route.path)]
        for name, schema in (route.query or {}).get("properties", {}).items():
            parameters.append({"name": name, "in": "query", "required": False, "schema": schema})
        if parameters:
            operation["parameters"] = parameters
        if route.body is not None:
            operation["requestBody"] = {"required": True, "content": {
                route.body_type: {"schema": route.body}}}
        responses: dict[str, Any] = {}
        for status, description in route.responses.items():
            entry: dict[str, Any] = {"description": description}
            if status >= 400:
                entry["content"] = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
            elif route.response_schema:
                entry["content"] = {"application/json": {
                    "schema": {"$ref": f"#/components/schemas/{route.response_schema}"}}}
            elif route.name == "metrics":
                entry["content"] = {"text/plain": {"schema": {"type": "string"}}}
            elif route.name == "preview" and status == 200:
                entry["content"] = {t: {"schema": {"type": "string", "format": "binary"}}
                                    for t in ("image/jpeg", "image/png")}
            elif route.name == "output" and status in (200, 206):
                entry["content"] = {"application/octet-stream": {
                    "schema": {"type": "string", "format": "binary"}}}
            responses[str(status)] = entry
        error_ref = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
        if route.name in _OPEN_ROUTES:
            operation["security"] = []
        else:
            responses.setdefault("401", {"description": "Missing or wrong API key", **error_ref})
        if route.name not in _UNLIMITED_ROUTES:
            responses.setdefault("429", {"description": "Rate limited; see Retry-After", **error_ref})
        responses["default"] = {"description": "Any other error, in the same envelope", **error_ref}
        operation["responses"] = responses
        path = "/".join(part.split(":")[0] + "}" if part.startswith("{") and ":" in part else part
                        for part in route.path.split("/"))
        paths.setdefault(path, {})[route.method.lower()] = operation
    return {
        "openapi": "3.1.0",
        "info": {"title": "comfymgr", "version": __version__,
                 "description": "The management API in front of ComfyUI: a durable priority "
                                "queue, a live event stream, metrics, files."},
        "paths": paths,
        "components": {
            "schemas": _COMPONENT_SCHEMAS,
            "securitySchemes": {"ApiKeyAuth": {"type": "apiKey", "in": "header", "name": "X-API-Key"}},
        },
        "security": [{"ApiKeyAuth": []}],
    }


def _path_params(path: str) -> list[str]:
    return [part[1:-1].split(":")[0] for part in path.split("/")
            if part.startswith("{") and part.endswith("}")]


_DOCS_HTML = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>comfymgr API</title>
<link rel="stylesheet" href="/docs/assets/swagger-ui.css">
</head>
<body>
<div id="swagger-ui"></div>
<script src="/docs/assets/swagger-ui-bundle.js"></script>
<script src="/docs/init.js"></script>
</body>
</html>
"""
# validatorUrl null: Swagger UI would otherwise send the document to an
# outside validator service.
_DOCS_INIT_JS = """window.ui = SwaggerUIBundle({
  url: "/openapi.json",
  dom_id: "#swagger-ui",
  validatorUrl: null,
  persistAuthorization: true,
  deepLinking: true
});
"""

OPENAPI = web.AppKey("openapi", dict)


async def _handle_openapi(request: web.Request) -> web.Response:
    return _json(request.app[OPENAPI])


async def _handle_docs(request: web.Request) -> web.Response:
    return web.Response(text=_DOCS_HTML, content_type="text/html")


async def _handle_docs_init(request: web.Request) -> web.Response:
    return web.Response(text=_DOCS_INIT_JS, content_type="application/javascript")


def _swagger_ui_files() -> dict[str, Path]:
    """Swagger UI's files by name, from the swagger-ui-bundle package."""
    try:
        import swagger_ui_bundle
    except ImportError:
        return {}
    folder = Path(swagger_ui_bundle.swagger_ui_path)
    return {p.name: p for p in folder.iterdir() if p.is_file()}


DOCS_FILES = web.AppKey("docs_files", dict)


async def _handle_docs_asset(request: web.Request) -> web.StreamResponse:
    path = request.app[DOCS_FILES].get(request.match_info["name"])
    if path is None:
        raise NotFound(f"no docs asset {request.match_info['name']!r}",
                       details={"path": request.path})
    return web.FileResponse(path, headers={"Cache-Control": "public, max-age=86400"})


###############################################################################
# dashboard
###############################################################################
# GET /ui: one page that shows the service live (ui/index.html, app.js and
# app.css beside this file, beside it in the .pyz too). The page and its
# files hold no data, so they need no key; everything they show comes from
# the keyed API. They are read once at startup and served from memory under
# a strict Content-Security-Policy: script and style from this origin only
# (no inline code, no eval), images from here or blob: (outputs and
# previews are fetched with the key, then shown from memory), no framing.

_UI_DIR = Path(__file__).resolve().parent / "ui"
_UI_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
             ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}
# A Host header fit to appear in the policy: a name or an IP, and a port.
_UI_HOST = re.compile(r"^(?:[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?$")


@dataclasses.dataclass(frozen=True)
class _UiFile:
    body: bytes
    content_type: str
    etag: str


def _ui_files(folder: Path | None = None) -> dict[str, _UiFile]:
    """The page's files by name. Only these names are ever served, so no
    request path can reach another file."""
    folder = folder or _UI_DIR
    files = {}
    if folder.is_dir():
        for path in sorted(folder.iterdir()):
            content_type = _UI_TYPES.get(path.suffix)
            if content_type and path.is_file():
                body = path.read_bytes()
                files[path.name] = _UiFile(body, content_type, f'"{hashlib.sha256(body).hexdigest()[:20]}"')
    return files


def _ui_headers(request: web.Request) -> dict[str, str]:
    # 'self' covers ws: and wss: to this host in current browsers (CSP 3);
    # the explicit sources are for older ones. Behind a proxy that drops the
    # port from Host they do not match, and 'self' still does.
    host = request.headers.get("Host", "")
    sockets = f" ws://{host} wss://{host}" if _UI_HOST.match(host) else ""
    return {
        "Content-Security-Policy": (
            "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; "
            f"connect-src 'self'{sockets}; base-uri 'none'; form-action 'none'; "
            "frame-ancestors 'none'"),
        "X-Frame-Options": "DENY",
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "Cross-Origin-Opener-Policy": "same-origin",
        "Cache-Control": "no-cache",  # revalidated (ETag): an upgrade shows at once
    }


UI_FILES = web.AppKey("ui_files", dict)


def _ui_response(request: web.Request, name: str) -> web.Response:
    file = request.app[UI_FILES].get(name)
    if file is None:
        if not request.app[UI_FILES]:
            raise NotFound("the dashboard is not installed: its ui/ folder is not beside comfymgr.py",
                           details={"path": request.path})
        raise NotFound(f"no dashboard file {name!r}", details={"path": request.path})
    headers = {**_ui_headers(request), "ETag": file.etag}
    given = request.headers.get("If-None-Match", "")
    if given.strip() == "*" or file.etag in (t.strip().removeprefix("W/") for t in given.split(",")):
        return web.Response(status=304, headers=headers)
    return web.Response(body=file.body, headers={**headers, "Content-Type": file.content_type})


async def _handle_ui(request: web.Request) -> web.Response:
    return _ui_response(request, "index.html")


async def _handle_ui_file(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    if not name:
        raise web.HTTPMovedPermanently("/ui")  # one address for the page: /ui
    return _ui_response(request, name)


###############################################################################
# app
###############################################################################
# create_app(config) wires the sections together. Each resource has one
# cleanup_ctx that starts it and stops it, in dependency order; background
# tasks are started and cancelled there and nowhere else.

_log_app = logging.getLogger("comfymgr.app")

API_KEY_FILE = "api-key"


def _resolve_api_keys(config: Config) -> tuple[_Key, ...]:
    """The admin keys (configured, or the generated one kept with mode 0600
    in the state directory) and the client keys. A key is never logged; the
    generated key's file path is, and so is the name of a key that is weak."""
    clients = tuple(_Key(key.encode("utf-8", "surrogateescape"), name, False)
                    for name, key in config.client_keys)
    for number, key in enumerate(config.api_keys, 1):
        if len(key) < _WEAK_KEY:
            _log_app.warning("MANAGEMENT_API_KEY key %d of %d is shorter than %d characters: "
                             "use a long random key (e.g. openssl rand -base64 32)", number,
                             len(config.api_keys), _WEAK_KEY)
    for name, key in config.client_keys:
        if len(key) < _WEAK_KEY:
            _log_app.warning("COMFYMGR_CLIENT_KEYS key %r is shorter than %d characters: use a "
                             "long random key (e.g. openssl rand -base64 32)", name, _WEAK_KEY)
    admins = _admin_keys(config)
    if {k.secret for k in admins} & {k.secret for k in clients}:
        raise ConfigError("COMFYMGR_CLIENT_KEYS: a client key is also a MANAGEMENT_API_KEY key")
    return admins + clients


_WEAK_KEY = 16


def _admin_keys(config: Config) -> tuple[_Key, ...]:
    if config.api_keys:
        return tuple(_Key(k.encode("utf-8", "surrogateescape"), ADMIN, True) for k in config.api_keys)
    path = config.state_dir / API_KEY_FILE
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        key = path.read_text().strip()
        if not key:
            raise ConfigError(f"{path} is empty; delete it to generate a new key") from None
        _log_app.info("MANAGEMENT_API_KEY is not set: using the key stored in %s", path)
    else:
        key = secrets.token_urlsafe(32)
        with os.fdopen(fd, "w") as handle:
            handle.write(key + "\n")
        _log_app.warning("MANAGEMENT_API_KEY is not set: generated a key and stored it in %s "
                         "(mode 0600); clients send it as X-API-Key", path)
    return (_Key(key.encode(), ADMIN, True),)


INPUT_SALT_FILE = "input-salt"


def _state_secret(path: Path) -> bytes:
    """32 random bytes kept (mode 0600) in the state directory, made once."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        try:
            secret = bytes.fromhex(path.read_text().strip())
        except ValueError:
            secret = b""
        if len(secret) < 16:
            raise ConfigError(f"{path} is damaged; delete it to make a new one") from None
        return secret
    secret = secrets.token_bytes(32)
    with os.fdopen(fd, "w") as handle:
        handle.write(secret.hex() + "\n")
    return secret


def _resolve_webhook_secrets(config: Config) -> tuple[bytes, ...]:
    """The configured signing secrets, or one generated and kept (0600) in
    the state directory, in the whsec_ form receivers are given."""
    if config.webhook_secrets:
        return config.webhook_secrets
    path = config.state_dir / WEBHOOK_SECRET_FILE
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        try:
            return _parse_webhook_secrets(path.read_text().strip())
        except ValueError as exc:
            raise ConfigError(f"{path}: {exc}; delete it to generate a new secret") from None
    with os.fdopen(fd, "w") as handle:
        handle.write("whsec_" + base64.b64encode(secrets.token_bytes(32)).decode() + "\n")
    _log_app.info("COMFYMGR_WEBHOOK_SECRET is not set: generated a signing secret in %s", path)
    return _parse_webhook_secrets(path.read_text().strip())


async def _storage_ctx(app: web.Application) -> Any:
    config = app[CONFIG]
    config.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    app[API_KEYS] = _resolve_api_keys(config)
    app[INPUT_SALT] = _state_secret(config.state_dir / INPUT_SALT_FILE)
    app[WEBHOOKS].secrets = _resolve_webhook_secrets(config)
    db = app[DB]
    await db.start()
    _log_app.info("database %s ready", db.path)
    if config.retention_days:
        _log_app.info("retention: finished jobs and their events are deleted after %d days%s "
                      "(COMFYMGR_RETENTION_DAYS; 0 keeps them)", config.retention_days,
                      ", their output files too" if config.retention_delete_outputs else
                      "; output files are kept")
    else:
        _log_app.info("retention is off (COMFYMGR_RETENTION_DAYS=0): finished jobs are kept forever")
    yield
    await db.close()
    _log_app.info("database closed")


async def _bridge_ctx(app: web.Application) -> Any:
    headers = app[CONFIG].backend_headers_file
    if headers.path is not None and headers.mode & 0o044:
        _log_app.warning("COMFYMGR_BACKEND_HEADERS_FILE %s holds backend secrets and is readable "
                         "by its group or others (mode %04o): chmod 0600 it, or hand it over with "
                         "systemd's LoadCredential= (docs/SCALING.md)", headers.path, headers.mode)
    bridge, hub = app[BRIDGE], app[HUB]
    for backend in bridge.backends.values():
        backend.on_preview = lambda run: hub.publish_preview(
            run.job_id, run.owner, run.preview.node_id if run.preview else None,
            run.preview.counter if run.preview else 0)
    await bridge.start()
    yield
    await bridge.stop()


async def _hub_ctx(app: web.Application) -> Any:
    hub = app[HUB]
    hub.latest_seq = (await app[DB].read(Storage.event_bounds))[1]
    app[SUPERVISOR].start("hub:tick", hub.tick_loop)
    app[SUPERVISOR].start("hub:prune", hub.prune_loop)
    yield
    await app[SUPERVISOR].stop("hub:")


async def _close_streams(app: web.Application) -> None:
    app[WAITERS].close()
    await app[HUB].close_all()


def _background(app: web.Application, coroutine: Any, what: str) -> None:
    """A short job of its own (removing files): its failure is logged and
    reported, never lost."""
    task = asyncio.ensure_future(coroutine)

    def done(task: asyncio.Task[Any]) -> None:
        if not task.cancelled() and task.exception() is not None:
            app[SUPERVISOR].report("background", task.exception())
            _log_app.warning("%s failed: %s", what, task.exception())
    task.add_done_callback(done)


def _publish_events(app: web.Application, events: list[Event]) -> None:
    """Every committed event passes here, in seq order, on the event loop."""
    app[QUEUE].saw(events)
    app[HUB].publish(events)
    app[WAITERS].notify(events)
    inputs = app[INPUTS]
    for event in events:
        if event.type in _END_EVENTS and event.job_id in inputs.pending and not inputs.keep:
            _background(app, inputs.remove(event.job_id), f"removing the inputs of {event.job_id}")
    if any(e.delivers for e in events):
        app[WEBHOOKS].wake.set()
    metrics = app[METRICS]
    now = app[CLOCK]()
    for event in events:
        metrics.stream_publish_lag.observe(max(0.0, now - event.ts / 1000))
        status = event.data.get("status")
        if event.type == EVENT_PROGRESS or status is None:
            continue
        metrics.workflow_total.labels(status).inc()
        if event.type == "workflow:error":
            error = event.data.get("error") or {}
            metrics.workflow_errors.labels(error.get("code", "unknown")).inc()
        started, ended = event.data.get("startTime"), event.data.get("completionTime")
        if status in ("completed", "failed", "cancelled") and started and ended:
            gpu_type = _gpu_type(app, event.data.get("backend"))
            metrics.workflow_duration.labels(gpu_type).observe(max(0.0, (ended - started) / 1000))


def _gpu_type(app: web.Application, backend_name: str | None) -> str:
    """The GPU model a backend runs on: NVML's name for its configured GPU,
    else what ComfyUI's /system_stats says ("cpu" for a CPU server)."""
    backend = app[BRIDGE].backends.get(backend_name or "")
    if backend is None:
        return "unknown"
    if backend.spec.gpu_index is not None:
        reading = app[GPUS].readings.get(backend.spec.gpu_index)
        if reading is not None and reading.name:
            return reading.name
    for device in backend.devices:
        if device.get("type") == "cpu":
            return "cpu"
        name = str(device.get("name") or "")
        if name:  # e.g. "cuda:0 NVIDIA H100 80GB HBM3 : cudaMallocAsync"
            name = name.split(" : ")[0]
            return name.split(" ", 1)[1] if name.startswith("cuda:") and " " in name else name
    return "unknown"


def _live_metrics(app: web.Application) -> Iterable[Any]:
    """Series read from live state at scrape time (see _Metrics)."""
    backends = list(app[BRIDGE].backends.values())
    yield _gauge("comfymgr_backend_up", "1 while comfymgr is connected to the ComfyUI server.",
                 ["backend"], [((b.name,), 1.0 if b.up else 0.0) for b in backends])
    yield _gauge("comfymgr_backend_info", "Always 1; the ComfyUI version and physical GPU of "
                 "each backend.", ["backend", "comfyui_version", "gpu_id"],
                 [((b.name, b.version or "", "" if b.spec.gpu_index is None else str(b.spec.gpu_index)), 1.0)
                  for b in backends])
    yield _gauge("comfymgr_jobs_running", "Jobs executing on each backend now.", ["backend"],
                 [((b.name,), float(sum(1 for r in b.runs.values() if r.started))) for b in backends])
    gpus = app[GPUS]
    if gpus.available and gpus.readings:
        readings = sorted(gpus.readings.values(), key=lambda r: r.index)
        good = [r for r in readings if r.error is None]

        def series(attr: str) -> list[tuple[Sequence[str], float]]:
            return [((str(r.index),), float(getattr(r, attr))) for r in good
                    if getattr(r, attr) is not None]

        yield _gauge("comfyui_gpu_utilization", "GPU utilization in percent (NVML).", ["gpu_id"],
                     series("utilization"))
        yield _gauge("comfyui_vram_usage_bytes", "GPU memory in use, bytes (NVML).", ["gpu_id"],
                     series("memory_used"))
        yield _gauge("comfymgr_gpu_memory_total_bytes", "GPU memory in all, bytes (NVML).",
                     ["gpu_id"], series("memory_total"))
        yield _gauge("comfymgr_gpu_temperature_celsius", "GPU temperature (NVML).", ["gpu_id"],
                     series("temperature"))
        yield _gauge("comfymgr_gpu_power_watts", "GPU power draw (NVML).", ["gpu_id"],
                     series("power"))
        yield _gauge("comfymgr_gpu_up", "1 while NVML reads the GPU; 0 when it errors (e.g. it "
                     "fell off the bus).", ["gpu_id"],
                     [((str(r.index),), 0.0 if r.error else 1.0) for r in readings])
        yield _gauge("comfymgr_gpu_info", "Always 1; each GPU's name and UUID.",
                     ["gpu_id", "name", "uuid"],
                     [((str(r.index), r.name or "", r.uuid or ""), 1.0) for r in readings])
    yield _gauge("comfymgr_gpu_available", "1 while NVML reads the GPUs, else 0 (no driver, a "
                 "CPU box, NVML failing: /v1/status gpu.reason says why).", [],
                 [((), 1.0 if gpus.available else 0.0)])
    filesystems = app[FILES].filesystems
    yield _gauge("comfymgr_filesystem_free_bytes", "Free bytes of the filesystem of the state "
                 "directory and of the configured ComfyUI folders (measured every minute).",
                 ["filesystem"], [((name, ), float(fs["freeBytes"])) for name, fs in filesystems.items()])
    yield _gauge("comfymgr_filesystem_size_bytes", "Size in bytes of the same filesystems.",
                 ["filesystem"], [((name, ), float(fs["sizeBytes"])) for name, fs in filesystems.items()])
    hub = app[HUB]
    yield _gauge("comfymgr_stream_clients", "WebSocket stream clients connected.", [],
                 [((), float(len(hub.subscribers)))])
    yield _gauge("comfymgr_stream_backlog_messages", "Messages waiting to be sent to the "
                 "slowest stream client.", [],
                 [((), float(max((sub.live for sub in hub.subscribers), default=0)))])


async def _files_ctx(app: web.Application) -> Any:
    files, supervisor = app[FILES], app[SUPERVISOR]
    supervisor.start("files:hash", files.hash_loop)
    supervisor.start("files:disk", files.disk_loop)
    supervisor.start("files:retention", app[RETENTION].loop)
    yield
    await files.close()
    await supervisor.stop("files:")


async def _fetcher_ctx(app: web.Application) -> Any:
    """The session that fetches inline inputs given as URLs."""
    app[FETCHER] = _outbound_session(app[POLICY], app[CONFIG].fetch_timeout, limit=16)
    await app[INPUTS].sweep(app[DB])
    yield
    await app[FETCHER].close()


async def _webhooks_ctx(app: web.Application) -> Any:
    webhooks = app[WEBHOOKS]
    await webhooks.start()
    app[SUPERVISOR].start("webhooks", webhooks.loop)
    yield
    await app[SUPERVISOR].stop("webhooks")
    await webhooks.stop()


async def _gpu_ctx(app: web.Application) -> Any:
    gpus = app[GPUS]
    await gpus.start()
    if gpus.available:
        app[SUPERVISOR].start("gpu:poll", gpus.poll_loop)
    yield
    await app[SUPERVISOR].stop("gpu:")
    await gpus.stop()


def create_app(config: Config, *, clock: Clock = time.time, nvml: Any = None,
               resolver: aiohttp.abc.AbstractResolver | None = None) -> web.Application:
    """The whole service as an aiohttp Application (tests run it on port 0).
    `nvml` replaces the pynvml module, `resolver` the DNS of outbound
    requests (tests pass stand-ins)."""
    app = web.Application(
        middlewares=[_metrics_middleware, _cors_middleware, _error_middleware,
                     _rate_limit_middleware, _auth_middleware],
        # JSON handlers enforce COMFYMGR_MAX_BODY_BYTES themselves; uploads are larger.
        client_max_size=max(config.max_body_bytes, config.max_upload_bytes + 64 * 1024),
    )
    app[CONFIG] = config
    app[CLOCK] = clock
    app[STARTED_AT] = clock()
    app[METRICS] = _Metrics()
    app[DB] = _Database(config.state_dir / "comfymgr.db", synchronous=config.db_synchronous,
                        on_events=lambda events: _publish_events(app, events))
    app[QUEUE] = _Queue(app[DB], clock, [b.name for b in config.backend_specs],
                        config.idempotency_ttl)
    app[SUPERVISOR] = _Supervisor(app[METRICS], clock)
    app[INPUTS] = _InputStore(config)
    app[WAITERS] = _Waiters()
    app[BRIDGE] = _Bridge(config, app[DB], app[QUEUE], clock, app[METRICS], app[SUPERVISOR],
                          app[INPUTS])
    app[HUB] = _Hub(app[DB], config, clock, app[SUPERVISOR])
    app[GPUS] = _GpuMonitor(config.gpu_poll_interval, clock, nvml)
    app[FILES] = _Files(config, app[DB], clock)
    app[RETENTION] = _Retention(config, app[DB], app[FILES], app[METRICS], clock)
    app[POLICY] = _TargetPolicy(config.webhook_allow, config.backend_specs, resolver)
    app[WEBHOOKS] = _Webhooks(config, app[DB], app[METRICS], clock, app[POLICY], app[SUPERVISOR])
    app[METRICS].live_state = lambda: _live_metrics(app)
    app[WEBHOOKS].with_data = lambda job, outputs: app[FILES].with_data(job, outputs,
                                                                       app[BRIDGE].backends)
    if config.rate_limit:
        app[RATE_LIMITER] = _RateLimiter(config.rate_limit, clock)
    routes = _routes()
    for route in routes:
        if route.method == "GET":  # every GET answers HEAD too (load balancers, downloads)
            app.router.add_get(route.path, route.handler, name=route.name, allow_head=True,
                               expect_handler=_expect_handler)
        else:
            app.router.add_route(route.method, route.path, route.handler, name=route.name,
                                 expect_handler=_expect_handler)
    app.router.add_get("/openapi.json", _handle_openapi, name="openapi")
    app.router.add_get("/docs", _handle_docs, name="docs")
    app.router.add_get("/docs/init.js", _handle_docs_init, name="docs_init")
    app.router.add_get("/docs/assets/{name}", _handle_docs_asset, name="docs_assets")
    app[DOCS_FILES] = _swagger_ui_files()
    app.router.add_get("/ui", _handle_ui, name="ui")
    app.router.add_get("/ui/{name:[^/]*}", _handle_ui_file, name="ui_files")
    app[UI_FILES] = _ui_files()
    app[OPENAPI] = _openapi_document(routes)
    app.cleanup_ctx.append(_storage_ctx)
    app.cleanup_ctx.append(_hub_ctx)
    app.cleanup_ctx.append(_gpu_ctx)
    app.cleanup_ctx.append(_files_ctx)
    app.cleanup_ctx.append(_webhooks_ctx)
    app.cleanup_ctx.append(_fetcher_ctx)
    app.cleanup_ctx.append(_bridge_ctx)
    app.on_shutdown.append(_close_streams)
    app.on_response_prepare.append(_plain_server_header)
    return app


###############################################################################
# client
###############################################################################
# comfymgr as its own client, for a person at a shell: `comfymgr submit
# workflow.json --wait --out ./pictures`. It speaks only the public HTTP API
# and the event stream, like any other client (backup alone reads the state
# database, on the box). It prints; it does not log.
#
# Exit codes, for scripts: 0 every job completed (or the command did what it
# said), 1 a job failed, was cancelled or timed out (or the server could not
# do it now: 409, 429, 5xx), 2 usage or configuration error (a 4xx that says
# the request was wrong), 3 comfymgr unreachable or the key refused, 130
# interrupted with Ctrl-C.
#
# Following jobs without a gap: the stream socket first unsubscribes from
# everything and asks for the latest seq (ping -> pong); jobs submitted (or
# read) after that are subscribed with `since` set to it, so the server
# replays whatever of theirs happened in between and then goes on live. A
# dropped socket resumes the same way from the last seq seen.

_EXIT_OK, _EXIT_JOB, _EXIT_USAGE, _EXIT_UNREACHABLE, _EXIT_INTERRUPTED = 0, 1, 2, 3, 130
_ENDED = ("completed", "failed", "cancelled")
_SUBSCRIBE_CHUNK = 200        # ids per subscribe message (the stream's 64 KiB message limit)
_RECONNECT_FOR = 30.0         # seconds a dropped stream is retried before giving up
_BAR_WIDTH = 20
_WS_ENDS = (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED,
            aiohttp.WSMsgType.ERROR)
_CLIENT_COMMANDS = ("submit", "status", "list", "cancel", "watch", "outputs", "backends", "backup")

_PROGRAM_HELP = f"""\
usage: comfymgr COMMAND [options]

comfymgr {__version__}: the management API in front of ComfyUI, and its client.

commands:
  submit FILE...   submit API-format workflows; --wait shows progress, --out saves the outputs
  status ID        one job
  list             the newest jobs
  cancel ID...     cancel jobs
  watch [ID...]    live job events
  outputs ID       list or download a job's outputs
  backends         the ComfyUI servers and GPUs
  backup DEST      copy the state database while the service runs (on the box)
  serve            run the service (the default; `comfymgr serve --help` lists every setting)

example:
  comfymgr submit workflow.json --wait --out ./pictures

Where: --url or COMFYMGR_URL (default http://127.0.0.1:9090); the key: --key,
MANAGEMENT_API_KEY, or the key file in COMFYMGR_STATE_DIR. `comfymgr COMMAND
--help` shows a command's options. Exit codes: 0 ok, 1 a job did not complete,
2 usage, 3 comfymgr unreachable or the key refused, 130 interrupted.
"""


class _ClientError(Exception):
    """One line for stderr (`error: <code>: <message>`) and the exit code it means."""

    def __init__(self, code: str, message: str, exit_code: int) -> None:
        super().__init__(f"{code}: {message}")
        self.code, self.message, self.exit_code = code, message, exit_code


def _exit_code_for_status(status: int) -> int:
    if status == 401:
        return _EXIT_UNREACHABLE
    if status in (409, 429) or status >= 500:
        return _EXIT_JOB
    return _EXIT_USAGE


def _env_setting(environ: Mapping[str, str], name: str) -> Any:
    """A service setting from the environment, parsed as the service parses it."""
    st = next(s for s in _SETTINGS if s.name == name)
    raw = environ.get(st.env, st.default)
    try:
        return st.parse(raw)
    except ValueError as exc:
        raise _ClientError("invalid_setting", f"{st.env}={raw!r}: {exc}", _EXIT_USAGE) from None


def _client_url(given: str | None, environ: Mapping[str, str]) -> str:
    """--url, COMFYMGR_URL, else the local service's own host and port."""
    for source, raw in (("--url", given), ("COMFYMGR_URL", environ.get("COMFYMGR_URL"))):
        if raw:
            try:
                return _parse_url(raw)
            except ValueError as exc:
                raise _ClientError("invalid_url", f"{source}={raw!r}: {exc}", _EXIT_USAGE) from None
    host, port = _env_setting(environ, "host"), _env_setting(environ, "port")
    host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _client_key(given: str | None, environ: Mapping[str, str]) -> str | None:
    """--key, the first of MANAGEMENT_API_KEY, else the generated key file when
    readable: on the box itself no key has to be typed."""
    if given:
        return given
    keys = _env_setting(environ, "api_keys")
    if keys:
        return keys[0]
    try:
        return (_env_setting(environ, "state_dir") / API_KEY_FILE).read_text().strip() or None
    except (OSError, UnicodeDecodeError):
        return None


class _Api:
    """comfymgr's HTTP API and stream; every failure becomes a _ClientError."""

    def __init__(self, session: aiohttp.ClientSession, url: str, key: str | None) -> None:
        self.session, self.url, self.key = session, url, key
        self.headers = {"X-API-Key": key} if key else {}

    async def call(self, method: str, path: str, body: Any = None,
                   params: Mapping[str, str] | None = None) -> tuple[int, Any]:
        try:
            async with self.session.request(method, self.url + path, json=body, params=params,
                                            headers=self.headers) as resp:
                raw = await resp.read()
                status, reason = resp.status, resp.reason
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
            raise self._unreachable(exc) from None
        try:
            data = json.loads(raw) if raw else None
        except ValueError:
            data = None
        if status >= 400:
            raise self._refused(status, data, reason or "")
        return status, data

    async def stream(self, params: Mapping[str, str] | None = None) -> aiohttp.ClientWebSocketResponse:
        try:
            return await self.session.ws_connect(self.url + "/v1/comfyui/stream", params=params,
                                                 headers=self.headers,
                                                 heartbeat=30.0, max_msg_size=16 * 1024 * 1024)
        except aiohttp.WSServerHandshakeError as exc:
            if exc.status == 401:  # the server's own words: a plain GET is refused the same way
                await self.call("GET", "/v1/comfyui/stream")
            raise _ClientError(f"http_{exc.status}", f"the event stream refused the connection: "
                               f"{exc.message}", _exit_code_for_status(exc.status)) from None
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
            raise self._unreachable(exc) from None

    async def download(self, url: str, folder: Path, name: str) -> Path:
        """Save one output as folder/name, or 'name (1).ext', ... when that exists."""
        # The output's path, always from this comfymgr: an absolute URL (with
        # COMFYMGR_PUBLIC_URL) may name a host the key must not be sent to.
        parts = urllib.parse.urlsplit(url)
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        part = folder / f".{name}.{secrets.token_hex(4)}.part"
        try:
            async with self.session.get(self.url + path, headers=self.headers) as resp:
                if resp.status != 200:
                    raw = await resp.read()
                    try:
                        data = json.loads(raw)
                    except ValueError:
                        data = None
                    raise self._refused(resp.status, data, resp.reason or "")
                # Blocking file calls on the loop: a command line has nothing
                # else to serve meanwhile but its own display.
                _make_folder(folder, "cannot_save", _EXIT_JOB)
                with open(part, "wb") as handle:  # noqa: ASYNC230
                    async for chunk in resp.content.iter_chunked(1 << 16):
                        handle.write(chunk)
            return _claim_name(part, folder, name)
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise self._unreachable(exc) from None
        except OSError as exc:  # the folder: not writable, full, ...
            raise _ClientError("cannot_save", f"{folder / name}: {exc.strerror or exc}", _EXIT_JOB) from None
        finally:
            with contextlib.suppress(OSError):  # renamed already, or never made
                part.unlink()

    def _unreachable(self, exc: BaseException) -> _ClientError:
        reason = getattr(exc, "os_error", None) or exc
        text = getattr(reason, "strerror", None) or str(reason) or type(exc).__name__
        return _ClientError("unreachable", f"cannot reach comfymgr at {self.url} ({text})",
                            _EXIT_UNREACHABLE)

    def _refused(self, status: int, data: Any, reason: str) -> _ClientError:
        if isinstance(data, dict) and isinstance(data.get("error"), str):
            code, message = data["error"], str(data.get("message") or reason)
        else:
            code, message = f"http_{status}", reason or "no answer"
        if status == 401 and not self.key:
            message += " (no key found: pass --key or set MANAGEMENT_API_KEY)"
        return _ClientError(code, message, _exit_code_for_status(status))


def _make_folder(folder: Path, code: str, exit_code: int) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise _ClientError(code, f"{folder}: not a folder", exit_code) from None
    except OSError as exc:
        raise _ClientError(code, f"{folder}: {exc.strerror or exc}", exit_code) from None


def _claim_name(part: Path, folder: Path, name: str) -> Path:
    """Give a finished file its name without ever replacing another file: the
    name is claimed by creating it exclusively (taken: 'stem (1).ext', ...),
    then the file is renamed over its own claim."""
    stem, ext = os.path.splitext(name)
    for n in range(10_000):
        target = folder / (name if n == 0 else f"{stem} ({n}){ext}")
        try:
            os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except FileExistsError:
            continue
        os.replace(part, target)
        return target
    raise _ClientError("file_exists", f"{folder / name} and 10,000 numbered copies exist", _EXIT_JOB)


def _output_name(output: Mapping[str, Any]) -> str:
    name = str(output.get("filename") or "").replace("\\", "/").rsplit("/", 1)[-1]
    return name.lstrip(".").strip() or "output"


def _load_workflow(path: str, stdin: Any) -> tuple[str, dict[str, Any]]:
    """(label, API-format graph) of a workflow file, `-` for stdin; a UI-format
    file is refused here, with the way to get the API format."""
    label = "stdin" if path == "-" else Path(path).name
    try:
        text = stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise _ClientError("invalid_file", f"{path}: {getattr(exc, 'strerror', None) or exc}",
                           _EXIT_USAGE) from None
    try:
        graph = json.loads(text)
    except ValueError as exc:
        raise _ClientError("invalid_file", f"{label}: not JSON ({exc})", _EXIT_USAGE) from None
    if isinstance(graph, dict) and isinstance(graph.get("nodes"), list) and isinstance(graph.get("links"), list):
        raise _ClientError("ui_format", f'{label} is a UI-format workflow (it has "nodes" and "links"); '
                           f'in ComfyUI use Workflow > Export (API) and submit that file', _EXIT_USAGE)
    if not isinstance(graph, dict) or not graph:
        raise _ClientError("invalid_file", f"{label}: an API-format workflow is a JSON object of nodes "
                           f'{{"1": {{"class_type": ..., "inputs": {{...}}}}, ...}}', _EXIT_USAGE)
    return label, graph


def _inline_input(spec: str) -> tuple[str, str]:
    """--input NAME=PATH: the file as a data: URI with its type."""
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise _ClientError("invalid_input", f"--input {spec!r}: expected NAME=PATH", _EXIT_USAGE)
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise _ClientError("invalid_input", f"--input {name}: {path}: {exc.strerror or exc}",
                           _EXIT_USAGE) from None
    mime = mimetypes.guess_type(path)[0] or "application/octet-stream"
    return name, f"data:{mime};base64,{base64.b64encode(data).decode()}"


# -- showing jobs ------------------------------------------------------------


def _clock_text(ms: Any) -> str:
    return time.strftime("%H:%M:%S", time.localtime(ms / 1000)) if isinstance(ms, (int, float)) else "-"


def _date_text(ms: Any) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000)) if ms else "-"


def _duration_text(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def _error_text(error: Any) -> str:
    if isinstance(error, dict):
        return f"{error.get('code', 'error')}: {error.get('message', '')}"
    return str(error)


def _table(rows: Sequence[Sequence[str]], right: Iterable[int] = ()) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    right = set(right)
    return "\n".join("  ".join(cell.rjust(w) if i in right else cell.ljust(w)
                               for i, (cell, w) in enumerate(zip(row, widths))).rstrip()
                     for row in rows)


class _Tracked:
    """One job being followed, as far as the events told."""

    def __init__(self, job_id: str, label: str, graph: Mapping[str, Any] | None = None) -> None:
        self.id, self.label = job_id, label
        self.node_types = {k: v.get("class_type") for k, v in (graph or {}).items() if isinstance(v, dict)}
        self.status, self.progress, self.node, self.position = "queued", 0.0, None, None
        self.outputs: list[dict[str, Any]] = []
        self.error: Any = None
        self.seq = 0
        self.began = time.monotonic()
        self.ended: float | None = None
        self.saved: list[str] = []

    @property
    def done(self) -> bool:
        return self.status in _ENDED

    def apply(self, message: Mapping[str, Any]) -> bool:
        """A stream event or a job view; False for one already seen."""
        seq = message.get("seq") or 0
        if seq and seq <= self.seq:
            return False
        self.seq = max(self.seq, seq)
        if self.done:
            return False
        self.status = message.get("status") or self.status
        if isinstance(message.get("progress"), (int, float)):
            self.progress = float(message["progress"])
        if "currentNode" in message:
            self.node = message["currentNode"]
        if "queuePosition" in message:
            self.position = message["queuePosition"]
        if message.get("outputs"):
            self.outputs = list(message["outputs"])
        if message.get("error"):
            self.error = message["error"]
        if self.status == "completed":
            self.progress = 100.0
        if self.done:
            self.ended = time.monotonic()
        return True

    def node_text(self) -> str:
        if not self.node:
            return ""
        kind = self.node_types.get(self.node)
        return f"node {self.node} {kind}" if kind else f"node {self.node}"

    def line(self) -> str:
        """The plain line: on a pipe, one per state or progress step change."""
        text = f"{self.label}: {self.status}"
        if self.status == "queued" and self.position:
            text += f" (position {self.position})"
        elif self.status == "running":
            text += f" {self.progress:.0f}% {self.node_text()}".rstrip()
        elif self.status == "completed":
            text += f" 100%, {len(self.outputs)} output{'s' if len(self.outputs) != 1 else ''}"
        elif self.error:
            text += f": {self.error_text()}"
        return text

    def error_text(self) -> str:
        code, message = _job_error(self)
        return message if code == self.status else f"{code}: {message}"

    def live_line(self, label_width: int, width: int) -> str:
        """The live line on a terminal: bar, percent, state, elapsed, node."""
        filled = round(self.progress / 100 * _BAR_WIDTH)
        elapsed = _duration_text((self.ended or time.monotonic()) - self.began)
        detail = self.node_text() if self.status == "running" else ""
        if self.status == "queued" and self.position:
            detail = f"position {self.position}"
        elif self.error:
            detail = self.error_text()
        text = (f"{self.label[:label_width].ljust(label_width)}  [{'#' * filled}{'.' * (_BAR_WIDTH - filled)}]"
                f" {self.progress:3.0f}%  {self.status:<9}  {elapsed}  {detail}").rstrip()
        return text[:width]


class _Display:
    """Jobs as they move: live lines redrawn in place on a terminal, plain
    lines on a pipe, JSON lines with --json."""

    def __init__(self, out: Any, mode: str) -> None:
        self.out, self.mode = out, mode  # mode: "live", "lines" or "json"
        self.jobs: list[_Tracked] = []
        self.drawn = 0                    # live lines on the screen, the cursor at the end of the last
        self.held = False                 # a question is on the screen: draw nothing
        self.shown: dict[str, tuple[Any, ...]] = {}

    def write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()

    def show(self, job: _Tracked, message: Mapping[str, Any] | None = None) -> None:
        if self.mode == "json":
            if message is not None:
                self.write(json.dumps(message, ensure_ascii=False) + "\n")
        elif self.mode == "lines":
            key = (job.status, job.node, int(job.progress // 10))
            if self.shown.get(job.id) != key:
                self.shown[job.id] = key
                self.write(job.line() + "\n")
        else:
            self.redraw()

    def redraw(self) -> None:
        if self.mode != "live" or not self.jobs or self.held:
            return
        width = max(20, shutil.get_terminal_size((100, 24)).columns - 1)  # never wrap: \r could not undo it
        label_width = min(30, max(len(j.label) for j in self.jobs))
        up = f"\x1b[{self.drawn - 1}A" if self.drawn > 1 else ""
        lines = "\n".join(f"\r{j.live_line(label_width, width)}\x1b[K" for j in self.jobs)
        self.drawn = len(self.jobs)
        self.write(up + lines)

    def note(self, text: str, *, error: bool = False) -> None:
        """A line of its own (on stderr for an error); on a terminal, above the
        live lines, which are drawn again below it."""
        if self.mode == "json" and not error:
            return
        if self.mode == "live" and self.drawn:
            self.write(f"\x1b[{self.drawn - 1}A\r\x1b[J" if self.drawn > 1 else "\r\x1b[J")
            self.drawn = 0
        if error:
            print(text, file=sys.stderr, flush=True)
        else:
            self.write(text + "\n")
        self.redraw()

    def close(self) -> None:
        """Leave the live lines where they are; what follows starts below them."""
        if self.mode == "live" and self.drawn:
            self.write("\n")
            self.drawn = 0


# -- following jobs on the stream ----------------------------------------------


async def _open_stream(api: _Api) -> tuple[aiohttp.ClientWebSocketResponse, int]:
    """A stream socket following nothing yet, and the latest seq."""
    ws = await api.stream()
    await ws.send_json({"type": "unsubscribe", "all": True})
    await ws.send_json({"type": "ping"})
    async for message in ws:
        if message.type == aiohttp.WSMsgType.TEXT:
            data = json.loads(message.data)
            if data.get("type") == "pong":
                return ws, int(data.get("seq") or 0)
    await ws.close()
    raise _ClientError("stream_closed", "the event stream closed before it answered", _EXIT_UNREACHABLE)


async def _subscribe(ws: aiohttp.ClientWebSocketResponse, ids: Sequence[str], since: int) -> None:
    for start in range(0, len(ids), _SUBSCRIBE_CHUNK):
        await ws.send_json({"type": "subscribe", "workflowIds": list(ids[start:start + _SUBSCRIBE_CHUNK]),
                            "since": since})


async def _follow(api: _Api, ws: aiohttp.ClientWebSocketResponse | None, since: int,
                  jobs: Mapping[str, _Tracked] | None,
                  on_event: Callable[[_Tracked | None, dict[str, Any]], None]) -> None:
    """Feed the events of `jobs` to on_event until all of them have ended
    (jobs None: every event, until cancelled); a dropped stream is reopened
    and resumed after the last seq seen."""
    lost_at: float | None = None
    try:
        while jobs is None or not all(job.done for job in jobs.values()):
            if ws is None:
                try:
                    ws = await _reopen(api, jobs, since)
                except _ClientError as exc:
                    if exc.exit_code != _EXIT_UNREACHABLE or lost_at is None or \
                            time.monotonic() - lost_at > _RECONNECT_FOR:
                        raise
                    await asyncio.sleep(1.0)
                    continue
                lost_at = None
            message = await ws.receive()
            if message.type in _WS_ENDS:
                await ws.close()
                ws, lost_at = None, lost_at or time.monotonic()
            if message.type != aiohttp.WSMsgType.TEXT:
                continue
            data = json.loads(message.data)
            kind = str(data.get("type", ""))
            if kind == "error" and data.get("code") != "since_expired":
                print(f"warning: the stream says {data.get('code')}: {data.get('message')}", file=sys.stderr)
            elif jobs is None:
                if kind.startswith("workflow:") or kind == "pong":
                    since = max(since, data.get("seq") or 0)
                if kind.startswith("workflow:"):
                    on_event(None, data)
            elif kind.startswith("workflow:"):
                job = jobs.get(data.get("workflowId"))
                if job is not None and job.apply(data):
                    on_event(job, data)
    finally:
        if ws is not None:
            await ws.close()


async def _reopen(api: _Api, jobs: Mapping[str, _Tracked] | None, since: int
                  ) -> aiohttp.ClientWebSocketResponse:
    if jobs is None:
        return await api.stream({"since": str(since)} if since else None)
    open_ = [j for j in jobs.values() if not j.done]
    ws, _ = await _open_stream(api)
    await _subscribe(ws, [j.id for j in open_], min(j.seq or since for j in open_))
    return ws


async def _ask(question: str, interrupted: asyncio.Event) -> bool:
    """y/N on the terminal; a second Ctrl-C is a no."""
    sys.stdout.write(question)
    sys.stdout.flush()
    loop = asyncio.get_running_loop()
    answer: asyncio.Future[bytes] = loop.create_future()
    fd = sys.stdin.fileno()
    loop.add_reader(fd, lambda: answer.done() or answer.set_result(os.read(fd, 1024)))
    interrupted.clear()
    waiter = asyncio.ensure_future(interrupted.wait())
    try:
        await asyncio.wait({answer, waiter}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        loop.remove_reader(fd)
        waiter.cancel()
    if not answer.done():
        sys.stdout.write("\n")
        return False
    return answer.result().strip().lower() in (b"y", b"yes")


###############################################################################
# client: commands
###############################################################################
# One function per subcommand of `comfymgr`, the argument parser, and
# _client_main, which main() calls for them.


async def _cmd_submit(api: _Api, args: argparse.Namespace, graphs: Sequence[tuple[str, dict[str, Any]]],
                      inputs: Mapping[str, str]) -> int:
    wait = args.wait or args.out is not None
    mode = "json" if args.json else "live" if sys.stdout.isatty() else "lines"
    display = _Display(sys.stdout, mode)
    labels = [label for label, _ in graphs]
    several = len(graphs) > 1
    ws, since = (await _open_stream(api)) if wait else (None, 0)
    jobs: dict[str, _Tracked] = {}
    worst = _EXIT_OK
    try:
        for n, (label, graph) in enumerate(graphs):
            if labels[:n].count(label):  # the same file twice: simple.json, simple.json#2
                label = f"{label}#{labels[:n].count(label) + 1}"
            body: dict[str, Any] = {"workflow": graph, "priority": args.priority}
            for field in ("gpu", "timeout"):
                if getattr(args, field) is not None:
                    body[field] = getattr(args, field)
            if inputs:
                body["inputs"] = dict(inputs)
            try:
                _, view = await api.call("POST", "/v1/comfyui/workflow", body)
            except _ClientError as exc:
                if exc.exit_code == _EXIT_UNREACHABLE:
                    raise
                _print_error(exc.code, f"{label}: {exc.message}" if several else exc.message)
                worst = max(worst, exc.exit_code)
                continue
            job = jobs[view["workflowId"]] = _Tracked(view["workflowId"], label, graph)
            job.apply(view)
            if args.json:
                display.write(json.dumps({"type": "job", "file": label, **view}, ensure_ascii=False) + "\n")
            elif not wait:
                display.write(f"{job.id}\n")
            else:
                display.write(f"{label}: submitted {job.id}\n")
        if not wait or not jobs:
            return worst
        display.jobs = list(jobs.values())
        for job in display.jobs:
            display.show(job)
        await _subscribe(ws, list(jobs), since)
        code = await _wait_for_jobs(api, args, ws, since, jobs, display)
        ws = None  # _wait_for_jobs closed it
    finally:
        if ws is not None:
            await ws.close()
    return code if code == _EXIT_INTERRUPTED else max(worst, code)


async def _wait_for_jobs(api: _Api, args: argparse.Namespace, ws: aiohttp.ClientWebSocketResponse,
                         since: int, jobs: Mapping[str, _Tracked], display: _Display) -> int:
    """Follow the jobs to their end, download outputs, and handle Ctrl-C."""
    downloads: list[asyncio.Task[None]] = []

    async def save(job: _Tracked) -> None:
        for output in job.outputs:
            try:
                path = await api.download(str(output.get("url", "")), Path(args.out), _output_name(output))
            except _ClientError as exc:
                display.note(f"error: {exc.code}: {job.label}: {_output_name(output)}: {exc.message}", error=True)
                job.saved.append("")  # counted as a failure below
                continue
            job.saved.append(str(path))
            display.note(f"{job.label}: saved {path}")

    def on_event(job: _Tracked, message: dict[str, Any]) -> None:
        display.show(job, message)
        if job.status == "completed":
            if args.out is not None:
                downloads.append(asyncio.create_task(save(job)))
        elif job.done:
            code, message = _job_error(job)
            display.note(f"error: {code}: {job.label + ': ' if len(jobs) > 1 else ''}{message}", error=True)

    loop = asyncio.get_running_loop()
    interrupted = asyncio.Event()
    loop.add_signal_handler(signal.SIGINT, interrupted.set)
    ticker = asyncio.create_task(_tick(display)) if display.mode == "live" else None
    follower = asyncio.create_task(_follow(api, ws, since, jobs, on_event))
    cancelling = False
    try:
        while True:
            stop = asyncio.ensure_future(interrupted.wait())
            await asyncio.wait({follower, stop}, return_when=asyncio.FIRST_COMPLETED)
            stop.cancel()
            if follower.done():
                break
            interrupted.clear()
            left = [j for j in jobs.values() if not j.done]
            if cancelling or not left:
                break
            if args.cancel_on_exit:
                cancel = True
            elif sys.stdin.isatty() and sys.stdout.isatty():
                display.close()
                display.held = True
                cancel = await _ask(f"Cancel {len(left)} unfinished job{'s' if len(left) > 1 else ''}"
                                    f" on comfymgr? [y/N] ", interrupted)
                display.held = False
            else:
                cancel = False
            if not cancel:
                display.close()
                ids = " ".join(j.id for j in left)
                print(f"interrupted: the job{'s keep' if len(left) > 1 else ' keeps'} running on comfymgr; "
                      f"follow with: comfymgr watch {ids}", file=sys.stderr)
                return _EXIT_INTERRUPTED
            cancelling = True
            for job in left:
                display.note(f"{job.label}: cancelling {job.id}")
                with contextlib.suppress(_ClientError):  # already ended: its own event says how
                    await api.call("DELETE", f"/v1/comfyui/workflow/{job.id}")
        if not follower.done():
            return _EXIT_INTERRUPTED
        follower.result()
        await asyncio.gather(*downloads)
    finally:
        loop.remove_signal_handler(signal.SIGINT)
        for task in (follower, ticker):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        display.close()
    if display.mode == "json":
        for job in jobs.values():
            _, view = await api.call("GET", f"/v1/comfyui/workflow/{job.id}")
            extra = {"saved": job.saved} if args.out is not None else {}
            display.write(json.dumps({"type": "job", "file": job.label, **view, **extra},
                                     ensure_ascii=False) + "\n")
    if cancelling:
        return _EXIT_INTERRUPTED
    ok = all(j.status == "completed" and "" not in j.saved for j in jobs.values())
    return _EXIT_OK if ok else _EXIT_JOB


async def _tick(display: _Display) -> None:
    while True:  # the elapsed time moves on between events
        await asyncio.sleep(1.0)
        display.redraw()


def _job_error(job: _Tracked) -> tuple[str, str]:
    error = job.error if isinstance(job.error, dict) else {}
    return str(error.get("code") or job.status), str(error.get("message") or f"the job {job.status}")


def _print_error(code: str, message: str) -> None:
    print(f"error: {code}: {message}", file=sys.stderr, flush=True)


async def _cmd_status(api: _Api, args: argparse.Namespace) -> int:
    _, job = await api.call("GET", f"/v1/comfyui/workflow/{urllib.parse.quote(args.id, safe='')}")
    rows = [("workflow", job["workflowId"]), ("status", job["status"])]
    progress = f"{job['progress']:.0f}%"
    rows.append(("progress", f"{progress}  node {job['currentNode']}" if job.get("currentNode") else progress))
    rows.append(("priority", job["priority"]))
    if job.get("queuePosition") is not None:
        rows.append(("position", str(job["queuePosition"])))
    rows.append(("gpu", str(job.get("gpu"))))
    if job.get("backend"):
        rows.append(("backend", job["backend"]))
    rows.append(("created", _date_text(job["createdAt"])))
    if job.get("startTime"):
        rows.append(("started", _date_text(job["startTime"])))
    if job.get("completionTime"):
        ended = _date_text(job["completionTime"])
        if job.get("startTime"):
            ended += f"  after {(job['completionTime'] - job['startTime']) / 1000:.1f} s"
        rows.append(("ended", ended))
    for output in job.get("outputs") or []:
        rows.append(("output", f"{_output_name(output)}  {output.get('url')}"))
    if job.get("error"):
        rows.append(("error", _error_text(job["error"])))
    print("\n".join(f"{name:<9} {value}" for name, value in rows))
    return _EXIT_OK


async def _cmd_list(api: _Api, args: argparse.Namespace) -> int:
    params = {"limit": str(args.limit)}
    if args.status:
        params["status"] = args.status
    _, page = await api.call("GET", "/v1/comfyui/workflows", params=params)
    if not page["workflows"]:
        print("no jobs")
        return _EXIT_OK
    rows = [("ID", "STATUS", "PRIORITY", "PROGRESS", "CREATED", "BACKEND")]
    rows += [(j["workflowId"], j["status"], j["priority"], f"{j['progress']:.0f}%",
              _date_text(j["createdAt"]), j.get("backend") or "-") for j in page["workflows"]]
    print(_table(rows, right=[3]))
    return _EXIT_OK


async def _cmd_cancel(api: _Api, args: argparse.Namespace) -> int:
    worst = _EXIT_OK
    for job_id in args.ids:
        try:
            status, answer = await api.call("DELETE", f"/v1/comfyui/workflow/{urllib.parse.quote(job_id, safe='')}")
        except _ClientError as exc:
            if exc.exit_code == _EXIT_UNREACHABLE:
                raise
            _print_error(exc.code, exc.message)
            worst = max(worst, exc.exit_code)
            continue
        print(f"{job_id}: cancelled" if status == 200 else f"{job_id}: cancelling (ComfyUI is interrupting it)")
    return worst


def _event_line(event: Mapping[str, Any]) -> str:
    """One human line per stream event (or job view) for `watch`."""
    kind = str(event.get("type", "")).removeprefix("workflow:")
    if kind == "error":
        kind = "failed"
    detail = ""
    if kind == "queued":
        detail = f"priority {event.get('priority')}"
        if event.get("queuePosition"):
            detail += f", position {event['queuePosition']}"
    elif kind == "started":
        detail = f"on {event.get('backend')}"
    elif kind == "progress":
        detail = f"{event.get('progress', 0):3.0f}%"
        if event.get("currentNode"):
            detail += f" node {event['currentNode']}"
    elif kind == "completed":
        names = [_output_name(o) for o in event.get("outputs") or []]
        detail = f"{len(names)} output{'s' if len(names) != 1 else ''}" + (f": {', '.join(names)}" if names else "")
    elif event.get("error"):
        detail = _error_text(event["error"])
    return f"{_clock_text(event.get('timestamp'))}  {event.get('workflowId')}  {kind:<9}  {detail}".rstrip()


def _view_event(view: Mapping[str, Any]) -> dict[str, Any]:
    """A job view as the event its status last produced (what `watch` shows first)."""
    kind = {"queued": "queued", "running": "progress", "completed": "completed",
            "failed": "error", "cancelled": "cancelled"}[view["status"]]
    when = {"queued": view.get("createdAt"), "progress": view.get("startTime")}.get(
        kind, view.get("completionTime"))
    return {**view, "type": f"workflow:{kind}", "timestamp": when}


async def _cmd_watch(api: _Api, args: argparse.Namespace) -> int:
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGINT, asyncio.current_task().cancel)

    def show(event: Mapping[str, Any]) -> None:
        text = json.dumps(event, ensure_ascii=False) if args.json else _event_line(event)
        sys.stdout.write(text + "\n")
        sys.stdout.flush()

    try:
        if not args.ids:  # everything from now on, until Ctrl-C; the pong's seq is where to resume
            ws = await api.stream()
            await ws.send_json({"type": "ping"})
            await _follow(api, ws, 0, None, lambda job, event: show(event))
            return _EXIT_OK  # not reached: it ends with Ctrl-C or an error
        ws, since = await _open_stream(api)
        jobs: dict[str, _Tracked] = {}
        try:
            for job_id in dict.fromkeys(args.ids):
                _, view = await api.call("GET", f"/v1/comfyui/workflow/{urllib.parse.quote(job_id, safe='')}")
                job = jobs[view["workflowId"]] = _Tracked(view["workflowId"], view["workflowId"])
                job.apply(view)
                show({"type": "job", **view} if args.json else _view_event(view))
        except BaseException:
            await ws.close()
            raise
        open_ = {i: j for i, j in jobs.items() if not j.done}
        await _subscribe(ws, list(open_), since)
        await _follow(api, ws, since, open_, lambda job, event: show(event))
        return _EXIT_OK if all(j.status == "completed" for j in jobs.values()) else _EXIT_JOB
    except asyncio.CancelledError:
        return _EXIT_INTERRUPTED
    finally:
        loop.remove_signal_handler(signal.SIGINT)


async def _cmd_outputs(api: _Api, args: argparse.Namespace) -> int:
    _, job = await api.call("GET", f"/v1/comfyui/workflow/{urllib.parse.quote(args.id, safe='')}")
    outputs = job.get("outputs") or []
    if not outputs:
        _print_error("no_outputs", f"workflow {job['workflowId']} has no outputs (status {job['status']})")
        return _EXIT_JOB
    for output in outputs:
        if args.out is None:
            print(f"{_output_name(output)}  {output.get('type')}  {output.get('url')}")
        else:
            print(f"saved {await api.download(str(output.get('url', '')), Path(args.out), _output_name(output))}")
    return _EXIT_OK


def _gib(count: Any) -> str:
    return f"{count / 2**30:.1f}" if isinstance(count, (int, float)) else "?"


async def _cmd_backends(api: _Api, args: argparse.Namespace) -> int:
    _, status = await api.call("GET", "/v1/status")
    counts = status["queue"]["byStatus"]
    jobs = ", ".join(f"{counts.get(s, 0)} {s}" for s in PUBLIC_STATUSES)
    if "backends" not in status:  # a client key (COMFYMGR_CLIENT_KEYS) sees its own queue only
        print(f"backends: shown to MANAGEMENT_API_KEY keys only; this is the client key {status.get('key')}")
        print(f"jobs: {jobs}")
        return _EXIT_OK
    rows = [("NAME", "STATE", "COMFYUI", "RUNNING", "DEVICES")]
    errors = []
    for b in status["backends"]:
        devices = ", ".join(
            f"{d.get('name')} ({_gib(d.get('vram_free'))}/{_gib(d.get('vram_total'))} GiB free)"
            if d.get("vram_total") else str(d.get("name")) for d in b.get("devices") or [])
        rows.append((b["name"], b["state"], b.get("comfyuiVersion") or "-", b.get("runningJob") or "-",
                     devices or "-"))
        if b.get("lastError"):
            errors.append(f"{b['name']}: {b['lastError']}")
    print(_table(rows))
    for line in errors:
        print(f"  {line}")
    gpu = status.get("gpu") or {}
    if not gpu.get("available"):
        print(f"gpus: no figures ({gpu.get('reason')})")
    for d in gpu.get("devices") or []:
        if d.get("error"):
            print(f"gpu {d['index']}  {d.get('name')}  error: {d['error']}")
            continue
        text = (f"gpu {d['index']}  {d.get('name')}  {d.get('utilization', 0):.0f}% busy  "
                f"{_gib(d.get('memoryUsedBytes'))}/{_gib(d.get('memoryTotalBytes'))} GiB  "
                f"{d.get('temperatureCelsius', 0):.0f} C")
        if d.get("powerWatts") is not None:
            text += f"  {d['powerWatts']:.0f} W"
        print(text + (f"  backends {', '.join(d['backends'])}" if d.get("backends") else ""))
    print(f"jobs: {jobs}")
    return _EXIT_OK


def _cmd_backup(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    """A consistent copy of the live database: SQLite's backup API from a
    read-only connection (in WAL mode it never blocks the service's writes),
    checked with integrity_check before it takes DEST's name."""
    state_dir = Path(args.state_dir) if args.state_dir else _env_setting(environ, "state_dir")
    source = state_dir / "comfymgr.db"
    if not source.is_file():
        raise _ClientError("no_database", f"{source} does not exist (set --state-dir or "
                           f"COMFYMGR_STATE_DIR)", _EXIT_USAGE)
    dest = Path(args.dest)
    if dest.is_dir():
        dest = dest / "comfymgr.db"
    if dest.exists() and not args.force:
        raise _ClientError("exists", f"{dest} exists; pass --force to replace it", _EXIT_USAGE)
    part = dest.parent / f".{dest.name}.{secrets.token_hex(4)}.part"
    try:
        src = sqlite3.connect(f"file:{urllib.parse.quote(str(source.resolve()))}?mode=ro", uri=True)
        try:
            copy = sqlite3.connect(part)
            try:
                src.backup(copy)  # all pages in one step: one read transaction, one snapshot
                check = copy.execute("PRAGMA integrity_check").fetchall()
                jobs = copy.execute("SELECT count(*) FROM jobs").fetchone()[0]
            finally:
                copy.close()
        finally:
            src.close()
        if check != [("ok",)]:
            raise _ClientError("corrupt_copy", f"integrity_check on the copy: "
                               f"{'; '.join(str(r[0]) for r in check[:5])}", _EXIT_JOB)
        with open(part, "rb") as handle:
            os.fsync(handle.fileno())
        if not args.force:  # claimed exclusively: a DEST that appeared meanwhile is not replaced
            os.close(os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        os.replace(part, dest)
    except sqlite3.Error as exc:
        raise _ClientError("backup_failed", f"{source}: {exc}", _EXIT_JOB) from None
    except FileExistsError:
        raise _ClientError("exists", f"{dest} exists; pass --force to replace it", _EXIT_USAGE) from None
    except OSError as exc:
        raise _ClientError("backup_failed", f"{dest}: {exc.strerror or exc}", _EXIT_JOB) from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            part.unlink()
    print(f"{source} -> {dest}: {dest.stat().st_size:,} bytes, {jobs:,} jobs, integrity ok")
    return _EXIT_OK


# -- the command line --------------------------------------------------------


def _client_parser() -> argparse.ArgumentParser:
    conn = argparse.ArgumentParser(add_help=False)
    conn.add_argument("--url", help="comfymgr's address (env COMFYMGR_URL; default the local service)")
    conn.add_argument("--key", help="the API key (env MANAGEMENT_API_KEY; default the state dir's key file)")
    parser = argparse.ArgumentParser(prog="comfymgr", add_help=False)
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name: str, summary: str, example: str, parents: Sequence[argparse.ArgumentParser] = (conn,)
                ) -> argparse.ArgumentParser:
        return commands.add_parser(name, parents=list(parents), description=textwrap.fill(summary, 79),
                                   epilog=f"example:\n  {example}",
                                   formatter_class=argparse.RawDescriptionHelpFormatter)

    p = command("submit", "Submit API-format workflow files (- reads stdin); print their ids, or "
                "follow them with --wait.", "comfymgr submit workflow.json --wait --out ./pictures")
    p.add_argument("files", nargs="+", metavar="FILE",
                   help='an API-format workflow (in ComfyUI: Export (API)); "-" reads stdin')
    p.add_argument("--priority", choices=PRIORITY_NAMES, default="normal")
    p.add_argument("--gpu", metavar="NAME", help="a backend's name, or any (default local)")
    p.add_argument("--input", action="append", default=[], metavar="NAME=PATH",
                   help="attach a local image; the workflow refers to it by NAME")
    p.add_argument("--timeout", metavar="S", type=_positive_duration, help="run-time limit (30s, 10m, 1h)")
    p.add_argument("--wait", action="store_true", help="follow the jobs to their end")
    p.add_argument("--out", metavar="DIR", help="save every output here (implies --wait)")
    p.add_argument("--json", action="store_true", help="JSON lines instead of text")
    p.add_argument("--cancel-on-exit", action="store_true", help="Ctrl-C cancels the jobs without asking")
    p = command("status", "Show one job.", "ID=$(comfymgr submit workflow.json) && comfymgr status $ID")
    p.add_argument("id", metavar="ID")
    p = command("list", "List the newest jobs.", "comfymgr list --status running --limit 10")
    p.add_argument("--status", choices=PUBLIC_STATUSES)
    p.add_argument("--limit", type=int, default=20, metavar="N", help="at most N jobs (default 20)")
    p = command("cancel", "Cancel jobs: queued ones at once, running ones are interrupted.",
                "ID=$(comfymgr submit workflow.json) && comfymgr cancel $ID")
    p.add_argument("ids", nargs="+", metavar="ID")
    p = command("watch", "Print job events as they happen: of the jobs named, until they end, or of "
                "every job, until Ctrl-C.", "ID=$(comfymgr submit workflow.json) && comfymgr watch $ID")
    p.add_argument("ids", nargs="*", metavar="ID")
    p.add_argument("--json", action="store_true", help="the stream's JSON messages, one a line")
    p = command("outputs", "List a job's outputs, or download them with --out.",
                "comfymgr outputs $ID --out ./pictures")
    p.add_argument("id", metavar="ID")
    p.add_argument("--out", metavar="DIR", help="save every output here (existing names are kept)")
    command("backends", "Show the ComfyUI servers, their GPUs and what they run.", "comfymgr backends")
    p = command("backup", "Copy the state database while the service runs (on the box), verified. "
                "To restore: stop comfymgr, delete comfymgr.db-wal and comfymgr.db-shm in the state "
                "directory, copy the backup over comfymgr.db, start comfymgr (docs/CLI.md).",
                "comfymgr backup /var/backups/comfymgr.db", parents=())
    p.add_argument("dest", metavar="DEST", help="a file, or a folder to put comfymgr.db in")
    p.add_argument("--state-dir", metavar="DIR", help="the service's state directory (env COMFYMGR_STATE_DIR)")
    p.add_argument("--force", action="store_true", help="replace DEST if it exists")
    return parser


def _positive_duration(text: str) -> float:
    try:
        seconds = _parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if seconds <= 0:
        raise argparse.ArgumentTypeError("expected a duration > 0")
    return seconds


def _client_main(argv: Sequence[str], environ: Mapping[str, str]) -> int:
    """`comfymgr COMMAND ...`: parse, run, turn every failure into one line and its exit code."""
    args = _client_parser().parse_args(argv)
    try:
        if args.command == "backup":
            return _cmd_backup(args, environ)
        url, key = _client_url(args.url, environ), _client_key(args.key, environ)
        if getattr(args, "out", None) is not None:  # before anything is sent
            _make_folder(Path(args.out), "invalid_out", _EXIT_USAGE)
            if not os.access(args.out, os.W_OK | os.X_OK):
                raise _ClientError("invalid_out", f"{args.out}: not writable", _EXIT_USAGE)
        graphs, inputs = [], {}
        if args.command == "submit":
            if args.files.count("-") > 1:
                raise _ClientError("invalid_file", "- (stdin) can be given once", _EXIT_USAGE)
            graphs = [_load_workflow(path, sys.stdin) for path in args.files]
            inputs = dict(_inline_input(spec) for spec in args.input)

        return asyncio.run(_client_run(args, url, key, graphs, inputs))
    except _ClientError as exc:
        _print_error(exc.code, exc.message)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return _EXIT_INTERRUPTED
    except (KeyError, TypeError, ValueError) as exc:  # an answer of another shape than this client knows
        _print_error("bad_answer", f"comfymgr answered what this client does not understand "
                                   f"({type(exc).__name__}: {exc}); is it another version than {__version__}?")
        return _EXIT_JOB
    except BrokenPipeError:  # `comfymgr list | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return _EXIT_OK


async def _client_run(args: argparse.Namespace, url: str, key: str | None,
                      graphs: Sequence[tuple[str, dict[str, Any]]], inputs: Mapping[str, str]) -> int:
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=120)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        api = _Api(session, url, key)
        if args.command == "submit":
            return await _cmd_submit(api, args, graphs, inputs)
        handler = {"status": _cmd_status, "list": _cmd_list, "cancel": _cmd_cancel, "watch": _cmd_watch,
                   "outputs": _cmd_outputs, "backends": _cmd_backends}[args.command]
        return await handler(api, args)


###############################################################################
# cli
###############################################################################


def main(argv: Sequence[str] | None = None) -> int:
    """The command line: `comfymgr [serve] [--SETTING VALUE ...]` runs the
    service; `comfymgr COMMAND ...` is its client (`comfymgr --help`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in _CLIENT_COMMANDS:
        # The client reads its connection settings (COMFYMGR_URL, the
        # service's host, port, key and state dir) from the environment here.
        return _client_main(argv, os.environ)
    if argv and argv[0] in ("-h", "--help"):
        print(_PROGRAM_HELP, end="")
        return 0
    if argv and argv[0] == "serve":
        argv = argv[1:]
    elif argv and not argv[0].startswith("-"):
        print(f"comfymgr: error: unknown command {argv[0]!r}; `comfymgr --help` lists them",
              file=sys.stderr)
        return 2
    return _serve_main(argv)


def _serve_main(argv: list[str]) -> int:
    """Run comfymgr until SIGTERM/SIGINT. Exit codes: 0 stopped cleanly,
    2 bad configuration (or the state directory is in use), 1 could not
    start."""
    try:
        config = load_config(argv)
    except ConfigError as exc:
        print(f"comfymgr: error: {exc}", file=sys.stderr)
        return 2
    if "--config-table" in argv:
        print(_config_table())
        return 0
    _setup_logging(config.log_format, config.log_level)
    # A hung event loop killed by systemd's watchdog (SIGABRT) leaves its
    # Python stack in the journal.
    faulthandler.enable()
    try:
        with _StateLock(config.state_dir):
            asyncio.run(_serve(config, _Notifier(os.environ)))
    except _StateDirInUse as exc:
        print(f"comfymgr: error: {exc}", file=sys.stderr)
        return 2
    except SchemaTooNew as exc:  # restarting cannot help: exit 2, which systemd does not retry
        _log_app.error("cannot start: %s", exc)
        return 2
    except (OSError, ConfigError, sqlite3.Error) as exc:
        _log_app.error("cannot start: %s", exc)
        return 1
    _log_app.info("stopped")
    return 0


class _StateDirInUse(ComfymgrError):
    """Another comfymgr process holds the state directory."""


class _StateLock:
    """An exclusive flock on <state dir>/lock for the life of the process:
    two comfymgr processes on one database would each reconcile, and so
    requeue, the other's jobs. The lock file names the PID holding it."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "lock"
        self._fd: int | None = None

    def __enter__(self) -> _StateLock:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise _StateDirInUse(f"another comfymgr (PID {holder}) is using the state directory "
                                 f"{self.path.parent}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._fd is not None:
            os.close(self._fd)  # releases the lock
            self._fd = None


class _Notifier:
    """systemd's notify protocol (sd_notify): one datagram per message to
    $NOTIFY_SOCKET; nothing at all when not started by systemd."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        address = environ.get("NOTIFY_SOCKET", "")
        self.address = "\0" + address[1:] if address.startswith("@") else address
        self.watchdog: float | None = None  # seconds between the pings systemd expects
        usec, pid = environ.get("WATCHDOG_USEC", ""), environ.get("WATCHDOG_PID", "")
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            self.watchdog = int(usec) / 1e6
        self._failed = False

    def send(self, *fields: str) -> None:
        if not self.address:
            return
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto("\n".join(fields).encode(), self.address)
        except OSError as exc:
            if not self._failed:  # said once: systemd would restart us for a missed watchdog
                _log_app.warning("cannot notify systemd at %s: %s", self.address.lstrip("\0"), exc)
            self._failed = True

    async def watchdog_loop(self) -> None:
        """WATCHDOG=1 from the event loop itself: a loop that hangs stops
        the pings, and systemd restarts the service."""
        assert self.watchdog is not None
        while True:
            self.send("WATCHDOG=1")
            await asyncio.sleep(self.watchdog / 2)


# How long a connection may stay open without completing a request (counted
# from the connect, or from the last answer): aiohttp's own default under an
# AppRunner is an hour, which would let slow clients hold descriptors for
# that long; 75 s is what web.run_app uses and nginx's keepalive_timeout.
_KEEPALIVE_TIMEOUT = 75.0


async def _serve(config: Config, notifier: _Notifier) -> None:
    """Serve until SIGTERM or SIGINT. "listening" is logged, and systemd
    told READY=1, only once the socket is bound."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    app = create_app(config)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=config.shutdown_timeout,
                           keepalive_timeout=_KEEPALIVE_TIMEOUT)
    try:
        await runner.setup()
        site = web.TCPSite(runner, config.host, config.port,
                           shutdown_timeout=config.shutdown_timeout)
        await site.start()
        addresses = ", ".join(_address_text(sock.getsockname())
                              for sock in (site._server.sockets if site._server else ()))
        _log_app.info("comfymgr %s listening on %s", __version__, addresses)
        notifier.send("READY=1", f"STATUS=listening on {addresses}", f"MAINPID={os.getpid()}")
        if notifier.watchdog:
            app[SUPERVISOR].start("systemd:watchdog", notifier.watchdog_loop)
        await stop.wait()
        _log_app.info("stopping")
        notifier.send("STOPPING=1")
        await app[SUPERVISOR].stop("systemd:")
    finally:
        await runner.cleanup()


def _address_text(address: Any) -> str:
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


if __name__ == "__main__":
    sys.exit(main())
