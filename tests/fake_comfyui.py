"""A fake ComfyUI server that behaves like the recordings of a real ComfyUI 0.3.64.

comfymgr's tests talk to this instead of a real ComfyUI: the same routes (each
also served under /api), the same JSON shapes, the same WebSocket messages in
the same order to the same sockets, and a queue and history kept in memory and
lost on restart. Prompts really run: validation with ComfyUI's error bodies,
nodes in dependency order, ComfyUI's output cache, progress ticks, interrupts
and execution errors. Images are stand-ins: SaveImage and PreviewImage write
small real PNG files; every other node only carries a description of the image
it would have made.

Data (node schemas, system stats, model folders) comes from tests/data/comfyui,
recorded from a real server (see docs/PROTOCOL.md). Where this file
models something newer than the recordings, it says so.

In tests::

    fake = FakeComfyUI(output_dir=tmp_path / "output")
    url = await fake.start()          # http://127.0.0.1:<free port>
    gate = fake.gate("ImageBlur")     # blur nodes now wait for gate.set()
    ...
    await fake.stop()

From a shell (benchmarks, crash harness)::

    python tests/fake_comfyui.py --port 8188 --output-dir /tmp/out \\
        --node-delay ImageBlur=0.5

prints ``listening on http://127.0.0.1:8188`` once it accepts connections, and
is driven through GET /__fake__/stats and POST /__fake__/mode ({"mode",
"latency", "ws_close_every"}), /__fake__/restart and /__fake__/drop_websockets.
"""

from __future__ import annotations

__version__ = "1.0"
__all__ = ["FakeComfyUI", "main"]

import argparse
import asyncio
import copy
import hashlib
import heapq
import inspect
import ipaddress
import itertools
import json
import logging
import math
import mimetypes
import os
import random
import signal
import socket
import struct
import sys
import time
import uuid
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse, urlsplit

from aiohttp import WSCloseCode, WSMsgType, web

log = logging.getLogger("fake_comfyui")


# ---------------------------------------------------------------------------
# Recorded facts
# ---------------------------------------------------------------------------

DATA_DIR = Path(__file__).resolve().parent / "data" / "comfyui"
HTTP_DATA_DIR = DATA_DIR / "http"
DEFAULT_OBJECT_INFO = HTTP_DATA_DIR / "object_info_subset.json"

# Where the recorded server lived; the tracebacks it sent name these paths.
COMFYUI_ROOT = "/opt/comfyui/ComfyUI"
PIL_IMAGE_PY = "/opt/comfyui/venv/lib/python3.11/site-packages/PIL/Image.py"

SERVER_FEATURES = {"supports_preview_metadata": True, "max_upload_size": 104857600}
SENSITIVE_EXTRA_DATA_KEYS = ("auth_token_comfy_org", "api_key_comfy_org")
MAXIMUM_HISTORY_SIZE = 10000
FAULT_MODES = ("ok", "hang", "http500", "html", "truncated")

MODEL_FILE_EXTENSIONS = {".ckpt", ".pt", ".pt2", ".bin", ".pth", ".safetensors", ".pkl", ".sft"}
# Loader inputs whose choices are the files of a model folder: with models_dir
# given, their lists follow the folder, like a real server after a rescan.
LOADER_INPUT_FOLDERS = {
    ("CheckpointLoaderSimple", "ckpt_name"): "checkpoints",
    ("LoraLoader", "lora_name"): "loras",
    ("VAELoader", "vae_name"): "vae",
    ("ControlNetLoader", "control_net_name"): "controlnet",
    ("UpscaleModelLoader", "model_name"): "upscale_models",
}

PREVIEW_PREFIX_LETTERS = "abcdefghijklmnopqrstupvxyz"  # sic: ComfyUI's own alphabet
UPSCALE_TILE_STRIDE = 480  # 512-pixel tiles overlapping by 32: gives the recorded 16 and 49 ticks
UPSCALE_FACTOR = 4
MAX_PNG_SIDE = 1024  # files stay small and quick to write; the size is a stand-in anyway

# ImageScaleBy runs in the recorded upscale workflow but is missing from the
# recorded object_info subset; this is its /object_info entry (nodes.py, 0.3.64).
SUPPLEMENTARY_OBJECT_INFO = {
    "ImageScaleBy": {
        "input": {"required": {"image": ["IMAGE"],
                               "upscale_method": [["nearest-exact", "bilinear", "area", "bicubic", "lanczos"]],
                               "scale_by": ["FLOAT", {"default": 1.0, "min": 0.01, "max": 8.0, "step": 0.01}]}},
        "input_order": {"required": ["image", "upscale_method", "scale_by"]},
        "output": ["IMAGE"], "output_is_list": [False], "output_name": ["IMAGE"], "name": "ImageScaleBy",
        "display_name": "Upscale Image By", "description": "", "python_module": "nodes",
        "category": "image/upscaling", "output_node": False,
    },
}

ERROR_500_TEXT = "500 Internal Server Error\n\nServer got itself in trouble"
HTML_PAGE = "<!DOCTYPE html>\n<html><head><title>502 Bad Gateway</title></head>\n<body><h1>Bad Gateway</h1></body></html>\n"
TRUNCATED_JSON = b'{"queue_running": [[0, "1f6f7f8f-940f-454a-8f6c-f874a1e8bd94", {"1": {"class_type": "Empty'

# Frames of the traceback ComfyUI sends with execution_error, down to the call
# of the node's function (execution.py of 0.3.64).
EXECUTE_FRAMES = [
    ("execution.py", 496, "execute",
     ("output_data, output_ui, has_subgraph, has_pending_tasks = await get_output_data(prompt_id, unique_id, obj, "
      "input_data_all, execution_block_cb=execution_block_cb, pre_execute_cb=pre_execute_cb, "
      "hidden_inputs=hidden_inputs)")),
    ("execution.py", 315, "get_output_data",
     ("return_values = await _async_map_node_over_list(prompt_id, unique_id, obj, input_data_all, obj.FUNCTION, "
      "allow_interrupt=True, execution_block_cb=execution_block_cb, pre_execute_cb=pre_execute_cb, "
      "hidden_inputs=hidden_inputs)")),
    ("execution.py", 289, "_async_map_node_over_list", "await process_inputs(input_dict, i)"),
    ("execution.py", 277, "process_inputs", "result = f(**inputs)"),
]
LOAD_IMAGE_FRAMES = [
    ("nodes.py", 1647, "load_image", "img = node_helpers.pillow(Image.open, image_path)"),
    ("node_helpers.py", 31, "pillow", "x = fn(arg)"),
    (PIL_IMAGE_PY, 3730, "open", "raise UnidentifiedImageError(msg)"),
]
SAVE_IMAGE_FRAMES = [
    ("nodes.py", 1590, "save_images",
     ("full_output_folder, filename, counter, subfolder, filename_prefix = folder_paths.get_save_image_path("
      "filename_prefix, self.output_dir, images[0].shape[1], images[0].shape[0])")),
    ("folder_paths.py", 397, "get_save_image_path", "raise Exception(err)"),
]
MODEL_LOADER_FRAMES = [
    ("comfy_extras/nodes_upscale_model.py", 35, "execute",
     'model_path = folder_paths.get_full_path_or_raise("upscale_models", model_name)'),
    ("folder_paths.py", 308, "get_full_path_or_raise",
     "raise FileNotFoundError(f\"Model in folder '{folder_name}' with filename '{filename}' not found.\")"),
]
# Frames of validate_prompt / validate_inputs for exceptions while validating.
VALIDATE_PROMPT_FRAME = ("execution.py", 1010, "validate_prompt", "m = await validate_inputs(prompt_id, prompt, o, validated)")
VALIDATE_INNER_FRAME = ("execution.py", 808, "validate_inputs", "r = await validate_inputs(prompt_id, prompt, o_id, validated)")
VALIDATE_INPUTS_FRAME = ("execution.py", 730, "validate_inputs", "inputs = prompt[unique_id]['inputs']")
LINKED_NODE_FRAME = ("execution.py", 788, "validate_inputs", "o_class_type = prompt[o_id]['class_type']")
LINKED_SOCKET_FRAME = ("execution.py", 790, "validate_inputs", "received_type = r[val[1]]")


# ---------------------------------------------------------------------------
# Utilities
# ---------------------------------------------------------------------------

def _now_ms(clock: Callable[[], float]) -> int:
    return int(clock() * 1000)


def _format_frames(frames) -> list[str]:
    """Traceback lines as traceback.format_tb writes them (without 3.11's carets)."""
    lines = []
    for file, line, func, code in frames:
        path = file if file.startswith("/") else f"{COMFYUI_ROOT}/{file}"
        lines.append(f'  File "{path}", line {line}, in {func}\n    {code}\n')
    return lines


def _full_type_name(exc: BaseException) -> str:
    klass = type(exc)
    if klass.__module__ == "builtins":
        return klass.__qualname__
    return f"{klass.__module__}.{klass.__qualname__}"


def _is_link(value) -> bool:
    """ComfyUI's test for a link input: ["node id", output index]."""
    return (isinstance(value, list) and len(value) == 2 and isinstance(value[0], str)
            and isinstance(value[1], (int, float)) and not isinstance(value[1], bool))


def _format_input_value(value):
    if value is None or isinstance(value, (int, float, bool, str)):
        return value
    return str(value)


def _png_bytes(width: int, height: int, rgb: tuple[int, int, int], text_chunks: list[tuple[str, str]]) -> bytes:
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    width, height = max(1, min(width, MAX_PNG_SIDE)), max(1, min(height, MAX_PNG_SIDE))
    raw = (b"\x00" + bytes(rgb) * width) * height
    out = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    for key, text in text_chunks:
        out += chunk(b"tEXt", key.encode("latin-1") + b"\x00" + text.encode("latin-1", "replace"))
    return out + chunk(b"IDAT", zlib.compress(raw, 4)) + chunk(b"IEND", b"")


def _sniff_image_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) of an image file Pillow would open, None if it is not one."""
    if data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) >= 24:
        return struct.unpack(">II", data[16:24])
    if data[:6] in (b"GIF87a", b"GIF89a") and len(data) >= 10:
        return struct.unpack("<HH", data[6:10])
    if data.startswith((b"\xff\xd8\xff", b"BM")) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP"):
        return (512, 512)  # a real decoder would know; the size only feeds stand-ins
    return None


def _model_files(folder: Path) -> list[str]:
    if not folder.is_dir():
        return []
    names = []
    for path in folder.rglob("*"):
        if path.is_file() and path.suffix.lower() in MODEL_FILE_EXTENSIONS:
            names.append(path.relative_to(folder).as_posix())
    return sorted(names)


def _image_files(folder: Path) -> list[str]:
    """The input files LoadImage offers: top level only, image mimetypes."""
    if not folder.is_dir():
        return []
    names = []
    for path in folder.iterdir():
        mime, _ = mimetypes.guess_type(path.name, strict=False)
        if path.is_file() and mime and mime.startswith("image/"):
            names.append(path.name)
    return sorted(names)


# ---------------------------------------------------------------------------
# Node catalog
# ---------------------------------------------------------------------------

class _NodeCatalog:
    """The node classes this server knows, answered from recorded /object_info data.

    A few lists are live, like on a real server: LoadImage offers the files of
    the input folder, and with models_dir the loaders offer its model files.
    """

    def __init__(self, object_info: dict[str, dict], dirs: _Dirs):
        self._info = object_info
        self._dirs = dirs

    def has(self, class_type) -> bool:
        return isinstance(class_type, str) and class_type in self._info

    def info(self, class_type: str) -> dict:
        info = copy.deepcopy(self._info[class_type])
        required = info.get("input", {}).get("required", {})
        if class_type == "LoadImage" and "image" in required:
            required["image"] = [_image_files(self._dirs.input), *required["image"][1:]]
        if self._dirs.models is not None:
            for (loader, input_name), folder in LOADER_INPUT_FOLDERS.items():
                if loader != class_type or input_name not in required:
                    continue
                files = _model_files(self._dirs.models / folder) + (["pixel_space"] if folder == "vae" else [])
                spec = required[input_name]
                if spec and spec[0] == "COMBO":
                    spec[1]["options"] = files
                else:
                    required[input_name] = [files, *spec[1:]]
        return info

    def all_info(self) -> dict[str, dict]:
        return {name: self.info(name) for name in self._info}

    def inputs(self, class_type: str) -> dict:
        """The input schema as validation and execution see it."""
        if self._dirs.models is not None and any(loader == class_type for loader, _ in LOADER_INPUT_FOLDERS):
            return self.info(class_type).get("input", {})
        return self._info[class_type].get("input", {})  # LoadImage's file list is not needed here

    def input_info(self, class_type: str, name: str, inputs: dict | None = None):
        """(input type, category, extra info) like ComfyUI's get_input_info."""
        inputs = inputs if inputs is not None else self.inputs(class_type)
        for category in ("required", "optional", "hidden"):
            if name in inputs.get(category, {}):
                spec = inputs[category][name]
                if category == "hidden":
                    return spec, category, {}
                extra = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
                return spec[0], category, extra
        return None, None, None

    def return_types(self, class_type: str) -> tuple:
        return tuple(self._info[class_type].get("output", []))

    def is_output(self, class_type: str) -> bool:
        return bool(self._info.get(class_type, {}).get("output_node"))

    def model_choices(self, class_type: str, input_name: str) -> list[str]:
        input_type, _, extra = self.input_info(class_type, input_name)
        if input_type == "COMBO":
            return list(extra.get("options", []))
        return list(input_type) if isinstance(input_type, list) else []


@dataclass
class _Dirs:
    output: Path
    input: Path
    temp: Path
    models: Path | None

    def by_type(self, type_name) -> Path | None:
        return {"output": self.output, "input": self.input, "temp": self.temp}.get(type_name)

    def split_annotation(self, name: str) -> tuple[str, Path | None]:
        """"x.png [output]" -> ("x.png", output folder), as folder_paths.annotated_filepath does."""
        for suffix, base in (("[output]", self.output), ("[input]", self.input), ("[temp]", self.temp)):
            if name.endswith(suffix):
                return name[:-len(suffix) - 1], base
        return name, None

    def annotated(self, name: str) -> Path:
        """Where LoadImage looks for a file name: the input folder unless annotated."""
        name, base = self.split_annotation(name)
        return (base or self.input) / name


# ---------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------

class _ValidationCrash(Exception):
    """An exception ComfyUI's validator would hit, with the frame it hits it in."""

    def __init__(self, original: BaseException, frame):
        super().__init__(str(original))
        self.original = original
        self.frame = frame


def _node_input_types_match(received, expected) -> bool:
    if received == expected:
        return True
    if not isinstance(received, str) or not isinstance(expected, str):
        return False
    received_set = {t.strip() for t in received.split(",")}
    expected_set = {t.strip() for t in expected.split(",")}
    return "*" in received_set or "*" in expected_set or bool(received_set & expected_set)


class _PromptValidator:
    """ComfyUI's validate_prompt: only nodes reachable from output nodes are checked.

    Reasons, messages and the quirks of the bookkeeping (downstream nodes of a
    failing node fail silently; dependent_outputs is filled per failing output)
    follow execution.py, so the 400 bodies match the recorded ones.
    """

    def __init__(self, catalog: _NodeCatalog, dirs: _Dirs):
        self.catalog = catalog
        self.dirs = dirs

    def validate(self, prompt: dict, partial_targets=None):
        outputs = []
        for node_id, node in prompt.items():
            if "class_type" not in node:
                return False, _error("invalid_prompt", "Cannot execute because a node is missing the class_type property.",
                                     f"Node ID '#{node_id}'"), [], {}
            class_type = node["class_type"]
            if not self.catalog.has(class_type):
                return False, _error("invalid_prompt", f"Cannot execute because node {class_type} does not exist.",
                                     f"Node ID '#{node_id}'"), [], {}
            if self.catalog.is_output(class_type) and (partial_targets is None or node_id in partial_targets):
                outputs.append(node_id)
        if not outputs:
            return False, _error("prompt_no_outputs", "Prompt has no outputs", ""), [], {}

        good_outputs, failed_outputs, node_errors, validated = [], [], {}, {}
        for output_id in outputs:
            try:
                valid, reasons = self._validate_node(prompt, output_id, validated, visiting=set())
            except _ValidationCrash as crash:
                valid = False
                reasons = [{
                    "type": "exception_during_validation",
                    "message": "Exception when validating node",
                    "details": str(crash.original),
                    "extra_info": {"exception_type": _full_type_name(crash.original),
                                   "traceback": _format_frames([VALIDATE_PROMPT_FRAME, crash.frame])},
                }]
                validated[output_id] = (False, reasons)
            if valid:
                good_outputs.append(output_id)
                continue
            failed_outputs.append((output_id, reasons))
            for node_id, (node_valid, node_reasons) in validated.items():
                # Nodes downstream of a failure are invalid without reasons of their own: not reported.
                if node_valid or not node_reasons:
                    continue
                if node_id not in node_errors:
                    node_errors[node_id] = {"errors": node_reasons, "dependent_outputs": [],
                                            "class_type": prompt[node_id]["class_type"]}
                node_errors[node_id]["dependent_outputs"].append(output_id)

        if not good_outputs:
            details = "\n".join(f"{r['message']}: {r['details']}" for _, reasons in failed_outputs for r in reasons)
            return False, _error("prompt_outputs_failed_validation", "Prompt outputs failed validation", details), [], node_errors
        return True, None, good_outputs, node_errors

    def _validate_node(self, prompt: dict, node_id: str, validated: dict, visiting: set):
        """(valid, reasons) of one node and, through its links, of its ancestors."""
        if node_id in validated:
            return validated[node_id]
        if node_id in visiting:
            # ComfyUI recurses until Python gives up; the outcome is the same error.
            raise _ValidationCrash(RecursionError("maximum recursion depth exceeded"), VALIDATE_INNER_FRAME)
        visiting.add(node_id)
        try:
            result = self._check_node(prompt, node_id, validated, visiting)
        except _ValidationCrash:
            raise
        except Exception as ex:
            raise _ValidationCrash(ex, VALIDATE_INPUTS_FRAME) from ex
        visiting.discard(node_id)
        validated[node_id] = result
        return result

    def _check_node(self, prompt: dict, node_id: str, validated: dict, visiting: set):
        node = prompt[node_id]
        inputs, class_type = node["inputs"], node["class_type"]
        schema = self.catalog.inputs(class_type)
        # LoadImage has VALIDATE_INPUTS(image): that input skips the generic checks.
        custom_checked = {"image"} if class_type == "LoadImage" else set()
        errors, valid = [], True

        for name in [*schema.get("required", {}), *schema.get("optional", {})]:
            input_type, category, extra = self.catalog.input_info(class_type, name, schema)
            if name not in inputs:
                if category == "required":
                    errors.append({"type": "required_input_missing", "message": "Required input is missing",
                                   "details": f"{name}", "extra_info": {"input_name": name}})
                continue
            value = inputs[name]
            info = [input_type, extra]
            if isinstance(value, list):
                if len(value) != 2:
                    errors.append({"type": "bad_linked_input",
                                   "message": "Bad linked input, must be a length-2 list of [node_id, slot_index]",
                                   "details": f"{name}",
                                   "extra_info": {"input_name": name, "input_config": info, "received_value": value}})
                    continue
                source_id = value[0]
                try:
                    source_class = prompt[source_id]["class_type"]
                except (KeyError, TypeError) as ex:
                    raise _ValidationCrash(ex, LINKED_NODE_FRAME) from ex
                try:
                    received_type = self.catalog.return_types(source_class)[value[1]]
                except (IndexError, TypeError) as ex:
                    raise _ValidationCrash(ex, LINKED_SOCKET_FRAME) from ex
                if not _node_input_types_match(received_type, input_type):
                    errors.append({"type": "return_type_mismatch", "message": "Return type mismatch between linked nodes",
                                   "details": f"{name}, received_type({received_type}) mismatch input_type({input_type})",
                                   "extra_info": {"input_name": name, "input_config": info,
                                                  "received_type": received_type, "linked_node": value}})
                    continue
                try:
                    source_valid, _ = self._validate_node(prompt, source_id, validated, visiting)
                except _ValidationCrash as crash:
                    valid = False
                    validated[source_id] = (False, [{
                        "type": "exception_during_inner_validation",
                        "message": "Exception when validating inner node",
                        "details": str(crash.original),
                        "extra_info": {"input_name": name, "input_config": info,
                                       "exception_message": str(crash.original),
                                       "exception_type": _full_type_name(crash.original),
                                       "traceback": _format_frames([VALIDATE_INNER_FRAME, crash.frame]),
                                       "linked_node": value},
                    }])
                    continue
                if not source_valid:
                    valid = False
                continue

            if isinstance(value, dict) and "__value__" in value:
                value = inputs[name] = value["__value__"]
            try:
                converter = {"INT": int, "FLOAT": float, "STRING": str, "BOOLEAN": bool}.get(input_type) \
                    if isinstance(input_type, str) else None
                if converter is not None:
                    value = inputs[name] = converter(value)
            except (ValueError, TypeError, OverflowError) as ex:
                errors.append({"type": "invalid_input_type",
                               "message": f"Failed to convert an input value to a {input_type} value",
                               "details": f"{name}, {value}, {ex}",
                               "extra_info": {"input_name": name, "input_config": info, "received_value": value,
                                              "exception_message": str(ex)}})
                continue
            if name in custom_checked:
                continue
            if "min" in extra and value < extra["min"]:
                errors.append(_range_error("value_smaller_than_min", f"Value {value} smaller than min of {extra['min']}",
                                           name, info, value))
                continue
            if "max" in extra and value > extra["max"]:
                errors.append(_range_error("value_bigger_than_max", f"Value {value} bigger than max of {extra['max']}",
                                           name, info, value))
                continue
            if isinstance(input_type, list) and value not in input_type:
                # ComfyUI leaves long lists (scanned model files) out of the answer.
                too_long = len(input_type) > 20
                list_info = f"(list of length {len(input_type)})" if too_long else str(input_type)
                errors.append({"type": "value_not_in_list", "message": "Value not in list",
                               "details": f"{name}: '{value}' not in {list_info}",
                               "extra_info": {"input_name": name, "input_config": None if too_long else info,
                                              "received_value": value}})
                continue

        if class_type == "LoadImage" and "image" in inputs and not _is_link(inputs["image"]):
            image = inputs["image"]
            if not self.dirs.annotated(str(image)).exists():
                errors.append({"type": "custom_validation_failed", "message": "Custom validation failed for node",
                               "details": f"image - Invalid image file: {image}", "extra_info": {"input_name": "image"}})

        return not errors and valid, errors


def _error(error_type: str, message: str, details: str) -> dict:
    return {"type": error_type, "message": message, "details": details, "extra_info": {}}


def _range_error(error_type, message, name, info, value) -> dict:
    return {"type": error_type, "message": message, "details": f"{name}",
            "extra_info": {"input_name": name, "input_config": info, "received_value": value}}


# ---------------------------------------------------------------------------
# Stand-in nodes
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class _StandIn:
    """What a node would have produced: a kind (IMAGE, MASK, MODEL...) and a size."""
    kind: str
    width: int = 64
    height: int = 64
    batch: int = 1
    color: int = 0
    name: str = ""

    def __str__(self) -> str:  # what current_inputs shows where ComfyUI prints a tensor
        name = f" {self.name}" if self.name else ""
        return f"<{self.kind} stand-in [{self.batch}, {self.height}, {self.width}, 3] color=#{self.color:06x}{name}>"

    def rgb(self) -> tuple[int, int, int]:
        return ((self.color >> 16) & 0xFF, (self.color >> 8) & 0xFF, self.color & 0xFF)

    def resized(self, width: int, height: int) -> _StandIn:
        return _StandIn(self.kind, max(1, int(width)), max(1, int(height)), self.batch, self.color, self.name)


class _NodeFailure(Exception):
    """A node raised: what ComfyUI reports about it in execution_error."""

    def __init__(self, exception_type: str, message: str, frames):
        super().__init__(message)
        self.exception_type = exception_type
        self.message = message
        self.frames = frames


class _Interrupted(Exception):
    """ComfyUI's InterruptProcessingException."""


@dataclass
class _NodeCall:
    node_id: str
    class_type: str
    values: dict[str, Any]      # input name -> the first value of ComfyUI's per-input list
    prompt: dict
    extra_data: dict


def _first_image(call: _NodeCall, name: str) -> _StandIn:
    value = call.values.get(name)
    return value if isinstance(value, _StandIn) else _StandIn("IMAGE")


class _StandInNodes:
    """The node functions: small stand-in values instead of tensors, real files for outputs."""

    def __init__(self, catalog: _NodeCatalog, dirs: _Dirs):
        self.catalog = catalog
        self.dirs = dirs
        self.preview_prefixes: dict[tuple[str, str], str] = {}  # ComfyUI keeps one PreviewImage object per node
        self.functions = {
            "EmptyImage": self._empty_image, "ImageInvert": self._image_invert, "ImageScale": self._image_scale,
            "ImageScaleBy": self._image_scale_by, "ImageBlur": self._image_blur, "LoadImage": self._load_image,
            "UpscaleModelLoader": self._upscale_model_loader, "ImageUpscaleWithModel": self._image_upscale_with_model,
            "SaveImage": self._save_image, "PreviewImage": self._preview_image,
        }

    def forget(self):
        self.preview_prefixes.clear()

    def run(self, call: _NodeCall):
        """Returns (one list per output slot, ui dict or None)."""
        function = self.functions.get(call.class_type)
        return function(call) if function is not None else (self._generic(call), None)

    def _empty_image(self, call):
        v = call.values
        return [[_StandIn("IMAGE", v.get("width", 512), v.get("height", 512), v.get("batch_size", 1), v.get("color", 0))]], None

    def _image_invert(self, call):
        image = _first_image(call, "image")
        return [[_StandIn("IMAGE", image.width, image.height, image.batch, image.color ^ 0xFFFFFF)]], None

    def _image_scale(self, call):
        image = _first_image(call, "image")
        width, height = call.values.get("width", 0), call.values.get("height", 0)
        if width == 0 and height == 0:
            width, height = image.width, image.height
        elif width == 0:
            width = round(image.width * height / image.height)
        elif height == 0:
            height = round(image.height * width / image.width)
        return [[image.resized(width, height)]], None

    def _image_scale_by(self, call):
        image, scale = _first_image(call, "image"), call.values.get("scale_by", 1.0)
        return [[image.resized(round(image.width * scale), round(image.height * scale))]], None

    def _image_blur(self, call):
        return [[_first_image(call, "image")]], None

    def _image_upscale_with_model(self, call):
        image = _first_image(call, "image")
        return [[image.resized(image.width * UPSCALE_FACTOR, image.height * UPSCALE_FACTOR)]], None

    def _upscale_model_loader(self, call):
        name = call.values.get("model_name")
        known = self.catalog.model_choices("UpscaleModelLoader", "model_name")
        on_disk = self.dirs.models is not None and (self.dirs.models / "upscale_models" / str(name)).is_file()
        if name not in known and not on_disk:
            raise _NodeFailure("FileNotFoundError",
                               f"Model in folder 'upscale_models' with filename '{name}' not found.", MODEL_LOADER_FRAMES)
        return [[_StandIn("UPSCALE_MODEL", name=str(name))]], None

    def _load_image(self, call):
        path = self.dirs.annotated(str(call.values.get("image")))
        try:
            data = path.read_bytes()
        except OSError as ex:
            raise _NodeFailure("FileNotFoundError", f"[Errno 2] No such file or directory: '{path}'",
                               LOAD_IMAGE_FRAMES[:2]) from ex
        size = _sniff_image_size(data)
        if size is None:
            raise _NodeFailure("PIL.UnidentifiedImageError", f"cannot identify image file '{path}'",
                               LOAD_IMAGE_FRAMES)
        width, height = size
        color = int.from_bytes(hashlib.sha256(data).digest()[:3], "big")  # a stable stand-in for its pixels
        return [[_StandIn("IMAGE", width, height, 1, color, path.name)], [_StandIn("MASK", width, height)]], None

    def _save_image(self, call):
        return [], {"images": self._save(call, self.dirs.output, "output", call.values.get("filename_prefix", "ComfyUI"))}

    def _preview_image(self, call):
        key = (call.node_id, call.class_type)
        if key not in self.preview_prefixes:
            self.preview_prefixes[key] = "_temp_" + "".join(random.choice(PREVIEW_PREFIX_LETTERS) for _ in range(5))
        return [], {"images": self._save(call, self.dirs.temp, "temp", "ComfyUI" + self.preview_prefixes[key])}

    def _generic(self, call):
        """Any other known class: one stand-in per output, sized after its inputs."""
        source = next((v for v in call.values.values() if isinstance(v, _StandIn)), None)
        width = call.values.get("width", source.width if source else 512)
        height = call.values.get("height", source.height if source else 512)
        batch = call.values.get("batch_size", source.batch if source else 1)
        color = source.color if source else 0
        kinds = self.catalog.return_types(call.class_type)
        return [[_StandIn(str(kind), width, height, batch, color)] for kind in kinds]

    def _save(self, call: _NodeCall, output_dir: Path, folder_type: str, filename_prefix: str) -> list[dict]:
        """SaveImage.save_images: counter continues from the files already there."""
        image = _first_image(call, "images")
        base = os.path.abspath(str(output_dir))
        if "%" in filename_prefix:
            filename_prefix = _expand_prefix_vars(filename_prefix, image.width, image.height)
        subfolder = os.path.dirname(os.path.normpath(filename_prefix))
        filename = os.path.basename(os.path.normpath(filename_prefix))
        folder = os.path.abspath(os.path.join(base, subfolder))
        common = os.path.commonpath((base, folder))
        if common != base:
            raise _NodeFailure("Exception",
                               "**** ERROR: Saving image outside the output folder is not allowed."
                               f"\n full_output_folder: {folder}\n         output_dir: {base}\n         commonpath: {common}",
                               SAVE_IMAGE_FRAMES)
        os.makedirs(folder, exist_ok=True)
        counter = _next_counter(os.listdir(folder), filename)
        text_chunks = [("prompt", json.dumps(call.prompt))]
        for key, value in (call.extra_data.get("extra_pnginfo") or {}).items():
            text_chunks.append((key, json.dumps(value)))
        results = []
        for batch_number in range(max(1, image.batch)):
            file = f"{filename.replace('%batch_num%', str(batch_number))}_{counter:05}_.png"
            Path(folder, file).write_bytes(_png_bytes(image.width, image.height, image.rgb(), text_chunks))
            results.append({"filename": file, "subfolder": subfolder, "type": folder_type})
            counter += 1
        return results


def _expand_prefix_vars(prefix: str, width: int, height: int) -> str:
    now = time.localtime()
    for var, value in (("%width%", width), ("%height%", height), ("%year%", now.tm_year),
                       ("%month%", f"{now.tm_mon:02}"), ("%day%", f"{now.tm_mday:02}"),
                       ("%hour%", f"{now.tm_hour:02}"), ("%minute%", f"{now.tm_min:02}"),
                       ("%second%", f"{now.tm_sec:02}")):
        prefix = prefix.replace(var, str(value))
    return prefix


def _next_counter(existing: list[str], filename: str) -> int:
    """folder_paths.get_save_image_path's counter: highest "<name>_NNNNN" + 1."""
    best = 0
    for entry in existing:
        head = entry[:len(filename) + 1]
        if os.path.normcase(head[:-1]) != os.path.normcase(filename) or not head.endswith("_"):
            continue
        try:
            best = max(best, int(entry[len(filename) + 1:].split("_")[0]))
        except ValueError:
            pass
    return best + 1


# ---------------------------------------------------------------------------
# Execution
# ---------------------------------------------------------------------------

def _node_signatures(prompt: dict, is_changed: Callable[[str, dict], Any]) -> dict[str, str]:
    """ComfyUI's cache key per node: class, inputs, is_changed and the same of every ancestor.

    Links count by their position in the ancestry, not by node id, so an equal
    graph under other ids hits the cache, as in ComfyUI.
    """
    def ancestry(node_id, ancestors, order):
        node = prompt.get(node_id)
        if not isinstance(node, dict):
            return
        inputs = node.get("inputs", {})
        for key in sorted(inputs):
            if _is_link(inputs[key]) and inputs[key][0] not in order:
                ancestors.append(inputs[key][0])
                order[inputs[key][0]] = len(ancestors) - 1
                ancestry(inputs[key][0], ancestors, order)

    def immediate(node_id, order):
        node = prompt.get(node_id)
        if not isinstance(node, dict):
            return ["NaN", uuid.uuid4().hex]  # like ComfyUI's NaN: equal to nothing, never cached
        inputs = node.get("inputs", {})
        signature = [node.get("class_type"), is_changed(node_id, node)]
        for key in sorted(inputs):
            value = inputs[key]
            signature.append([key, ["ANCESTOR", order[value[0]], value[1]] if _is_link(value) else value])
        return signature

    signatures = {}
    for node_id in prompt:
        ancestors, order = [], {}
        ancestry(node_id, ancestors, order)
        parts = [immediate(node_id, order)] + [immediate(a, order) for a in ancestors]
        signatures[node_id] = json.dumps(parts, sort_keys=True, default=repr)
    return signatures


class _ExecutionOrder:
    """ComfyUI's ExecutionList: the nodes outputs need, skipping cached ones, staged one at a time.

    Among ready nodes it picks an output node first, then one feeding an output,
    then one two steps from an output, else the first: ComfyUI's "UX friendly" pick.
    """

    def __init__(self, prompt: dict, is_output: Callable[[str], bool], is_cached: Callable[[str], bool]):
        self.prompt = prompt
        self.is_output = is_output
        self.is_cached = is_cached
        self.pending: dict[str, bool] = {}
        self.block_count: dict[str, int] = {}
        self.blocking: dict[str, dict[str, dict]] = {}
        self.staged: str | None = None

    def add_node(self, node_id: str):
        stack, links = [node_id], []
        while stack:
            unique_id = stack.pop()
            if unique_id in self.pending:
                continue
            self.pending[unique_id] = True
            self.block_count[unique_id] = 0
            self.blocking[unique_id] = {}
            for value in self.prompt[unique_id]["inputs"].values():
                if _is_link(value) and not self.is_cached(value[0]):
                    stack.append(value[0])
                    links.append((value[0], value[1], unique_id))
        for source, socket_index, target in links:
            if not self.is_cached(source):
                self.add_node(source)
                if target not in self.blocking[source]:
                    self.blocking[source][target] = {}
                    self.block_count[target] += 1
                self.blocking[source][target][socket_index] = True

    def is_empty(self) -> bool:
        return not self.pending

    def stage(self) -> str | None:
        ready = [n for n in self.pending if self.block_count[n] == 0]
        if not ready:
            return None
        self.staged = self._pick(ready)
        return self.staged

    def _pick(self, ready: list[str]) -> str:
        for node_id in ready:
            if self.is_output(node_id):
                return node_id
        for node_id in ready:
            if any(self.is_output(b) for b in self.blocking[node_id]):
                return node_id
        for node_id in ready:
            if any(self.is_output(b2) for b in self.blocking[node_id] for b2 in self.blocking[b]):
                return node_id
        return ready[0]

    def complete(self):
        node_id, self.staged = self.staged, None
        del self.pending[node_id]
        for blocked in self.blocking.pop(node_id):
            self.block_count[blocked] -= 1


class _ProgressRegistry:
    """Per-run node progress, sent whole as progress_state on every change (comfy_execution/progress.py)."""

    def __init__(self, prompt_id: str, send: Callable[[str, dict], None]):
        self.prompt_id = prompt_id
        self.send = send
        self.nodes: dict[str, dict] = {}

    def _entry(self, node_id):
        return self.nodes.setdefault(node_id, {"state": "pending", "value": 0, "max": 1})

    def start(self, node_id):
        self._entry(node_id).update(state="running", value=0.0, max=1.0)
        self._send()

    def update(self, node_id, value, maximum):
        self._entry(node_id).update(state="running", value=value, max=maximum)
        self._send()

    def finish(self, node_id):
        entry = self._entry(node_id)
        entry.update(state="finished", value=entry["max"])
        self._send()

    def _send(self):
        nodes = {
            node_id: {"value": e["value"], "max": e["max"], "state": e["state"], "node_id": node_id,
                      "prompt_id": self.prompt_id, "display_node_id": node_id, "parent_node_id": None,
                      "real_node_id": node_id}
            for node_id, e in self.nodes.items() if e["state"] != "pending"
        }
        self.send("progress_state", {"prompt_id": self.prompt_id, "nodes": nodes})


class _PromptExecutor:
    """Runs one prompt like ComfyUI's PromptExecutor, sending the same messages.

    The caches hold what the last prompt left that this prompt can use: before
    each run, entries whose signature is not in the new prompt are dropped.
    """

    def __init__(self, fake: FakeComfyUI):
        self.fake = fake
        self.reset()

    def reset(self):
        self.output_cache: dict[str, list] = {}
        self.ui_cache: dict[str, dict] = {}
        self.fake._nodes.forget()
        self.status_messages: list[list] = []
        self.success = True
        self.history_result: dict = {"outputs": {}, "meta": {}}

    def _add_message(self, event: str, data: dict, broadcast: bool):
        data = {**data, "timestamp": _now_ms(self.fake._clock)}
        self.status_messages.append([event, data])
        if self.fake._client_id is not None or broadcast:
            self.fake._send(event, data, self.fake._client_id)

    def _is_changed(self, node_id: str, node: dict):
        # LoadImage.IS_CHANGED hashes the file, so a changed input reruns the node.
        if node.get("class_type") != "LoadImage":
            return False
        try:
            return hashlib.sha256(self.fake._dirs.annotated(str(node["inputs"]["image"])).read_bytes()).hexdigest()
        except (OSError, KeyError):
            return ["NaN", uuid.uuid4().hex]

    async def execute(self, prompt: dict, prompt_id: str, extra_data: dict, execute_outputs: list[str]):
        fake = self.fake
        fake._interrupt.clear()
        fake._client_id = extra_data.get("client_id")
        self.status_messages = []
        self._add_message("execution_start", {"prompt_id": prompt_id}, broadcast=False)
        fake._count_execution_start(prompt_id)

        progress = _ProgressRegistry(prompt_id, lambda event, data: fake._send(event, data, fake._client_id))
        signatures = _node_signatures(prompt, self._is_changed)
        in_use = set(signatures.values())
        for cache in (self.output_cache, self.ui_cache):
            for key in [k for k in cache if k not in in_use]:
                del cache[key]
        cached_nodes = [n for n in prompt if signatures[n] in self.output_cache]
        self._add_message("execution_cached", {"nodes": cached_nodes, "prompt_id": prompt_id}, broadcast=False)

        executed: dict[str, None] = {}  # an ordered set
        order = _ExecutionOrder(prompt, lambda n: fake._catalog.is_output(prompt[n]["class_type"]),
                                lambda n: signatures.get(n) in self.output_cache)
        for node_id in execute_outputs:
            order.add_node(node_id)
        while not order.is_empty():
            node_id = order.stage()
            if node_id is None:
                error = {"node_id": next(iter(order.pending)), "exception_message": "Dependency cycle detected",
                         "exception_type": "graph.DependencyCycleError", "traceback": [], "current_inputs": []}
                self._report_failure(prompt, prompt_id, executed, error, interrupted=False)
                break
            await asyncio.sleep(0)  # let HTTP handlers (an interrupt, a new prompt) in between nodes
            failure = await self._execute_node(prompt, prompt_id, extra_data, node_id, signatures, progress, executed)
            self.success = failure is None
            if failure is not None:
                error, interrupted = failure
                self._report_failure(prompt, prompt_id, executed, error, interrupted)
                break
            order.complete()
        else:
            self._add_message("execution_success", {"prompt_id": prompt_id}, broadcast=False)

        outputs, meta = {}, {}
        for node_id in prompt:
            ui = self.ui_cache.get(signatures[node_id])
            if ui is not None:
                outputs[node_id], meta[node_id] = ui["output"], ui["meta"]
        self.history_result = {"outputs": outputs, "meta": meta}
        fake._last_node_id = None

    def _report_failure(self, prompt, prompt_id, executed, error, interrupted: bool):
        node_id = error["node_id"]
        message = {"prompt_id": prompt_id, "node_id": node_id, "node_type": prompt[node_id]["class_type"],
                   "executed": list(executed)}
        if interrupted:
            self._add_message("execution_interrupted", message, broadcast=True)
            return
        message.update({"exception_message": error["exception_message"], "exception_type": error["exception_type"],
                        "traceback": error["traceback"], "current_inputs": error["current_inputs"],
                        "current_outputs": list(prompt)})
        self._add_message("execution_error", message, broadcast=False)

    async def _execute_node(self, prompt, prompt_id, extra_data, node_id, signatures, progress, executed):
        """Runs one node; returns None, or (error details, interrupted?) like ComfyUI's execute()."""
        fake = self.fake
        node = prompt[node_id]
        class_type = node["class_type"]
        signature = signatures[node_id]
        if signature in self.output_cache:
            # Only output nodes get here: ComfyUI re-announces their cached result.
            if fake._client_id is not None:
                output = (self.ui_cache.get(signature) or {}).get("output")
                fake._send("executed", {"node": node_id, "display_node": node_id, "output": output,
                                        "prompt_id": prompt_id}, fake._client_id)
            progress.finish(node_id)
            return None

        input_lists = None
        try:
            progress.start(node_id)
            input_lists = self._input_data(node, node_id, prompt, extra_data, signatures)
            if fake._client_id is not None:
                fake._last_node_id = node_id
                fake._send("executing", {"node": node_id, "display_node": node_id, "prompt_id": prompt_id},
                           fake._client_id)
            fake._check_interrupt()
            call = _NodeCall(node_id, class_type, {k: (v[0] if v else None) for k, v in input_lists.items()},
                             prompt, extra_data)
            await self._work(call, prompt_id, progress)
            outputs, ui = fake._nodes.run(call)
        except _Interrupted:
            return {"node_id": node_id}, True
        except _NodeFailure as failure:
            return self._failure_details(node_id, failure, input_lists), False

        if ui:
            self.ui_cache[signature] = {
                "meta": {"node_id": node_id, "display_node": node_id, "parent_node": None, "real_node_id": node_id},
                "output": ui,
            }
            if fake._client_id is not None:
                fake._send("executed", {"node": node_id, "display_node": node_id, "output": ui, "prompt_id": prompt_id},
                           fake._client_id)
        self.output_cache[signature] = outputs
        progress.finish(node_id)
        executed[node_id] = None
        return None

    def _failure_details(self, node_id, failure: _NodeFailure, input_lists) -> dict:
        current_inputs = {}
        for name, values in (input_lists or {}).items():
            current_inputs[name] = [_format_input_value(v) for v in values]
        return {"node_id": node_id, "exception_message": f"{failure.message}\n", "exception_type": failure.exception_type,
                "traceback": _format_frames(EXECUTE_FRAMES + list(failure.frames)), "current_inputs": current_inputs}

    def _input_data(self, node, node_id, prompt, extra_data, signatures) -> dict[str, list]:
        """ComfyUI's get_input_data: links resolved from the output cache, then hidden inputs."""
        catalog = self.fake._catalog
        class_type = node["class_type"]
        data: dict[str, list] = {}
        for name, value in node["inputs"].items():
            _, category, _ = catalog.input_info(class_type, name)
            if _is_link(value):
                outputs = self.output_cache.get(signatures.get(value[0]))
                index = int(value[1])
                data[name] = outputs[index] if outputs is not None and 0 <= index < len(outputs) else [None]
            elif category is not None:
                data[name] = [value]
        for name, kind in catalog.inputs(class_type).get("hidden", {}).items():
            if kind == "PROMPT":
                data[name] = [prompt]
            elif kind == "EXTRA_PNGINFO":
                data[name] = [extra_data.get("extra_pnginfo")]
            elif kind == "UNIQUE_ID":
                data[name] = [node_id]
        return data

    async def _work(self, call: _NodeCall, prompt_id: str, progress: _ProgressRegistry):
        """The time a node takes: delay, progress ticks, gate, injected failure."""
        fake = self.fake
        steps = fake.progress_steps.get(call.class_type)
        if steps is None:
            steps = self._default_progress_steps(call)
        delay = fake.node_delay.get(call.class_type, 0.0)
        if steps:
            for step in range(1, steps + 1):
                if delay:
                    await asyncio.sleep(delay / steps)
                # ComfyUI's progress hook checks for an interrupt before reporting the tick.
                fake._check_interrupt()
                progress.update(call.node_id, step, steps)
                fake._send("progress", {"value": step, "max": steps, "prompt_id": prompt_id, "node": call.node_id},
                           fake._client_id)
                if call.class_type in fake.preview_nodes:
                    fake._send_preview(prompt_id, call.node_id, step)
        elif delay:
            await asyncio.sleep(delay)  # like a blur: an interrupt waits for the next node
        if call.class_type in fake._gates:
            await fake._wait_at_gate(call, prompt_id)
        if call.class_type in fake.fail_node:
            exception_type, message = fake.fail_node[call.class_type]
            frames = [("nodes.py", 1, call.class_type, f"raise {exception_type}({message!r})")]
            raise _NodeFailure(exception_type, message, frames)

    @staticmethod
    def _default_progress_steps(call: _NodeCall) -> int:
        if call.class_type == "ImageUpscaleWithModel":
            image = _first_image(call, "image")
            return math.ceil(image.width / UPSCALE_TILE_STRIDE) * math.ceil(image.height / UPSCALE_TILE_STRIDE) * image.batch
        if call.class_type == "KSampler":
            return int(call.values.get("steps") or 0)
        return 0


# ---------------------------------------------------------------------------
# Queue and history
# ---------------------------------------------------------------------------

class _PromptQueue:
    """ComfyUI's PromptQueue: a heap of pending prompts, the running one, and history.

    Every change calls on_change(), which broadcasts the queue status, exactly
    where ComfyUI calls queue_updated() (including its double status when the
    last pending item is deleted). Items are [number, prompt_id, prompt,
    extra_data, output_node_ids]. Single-threaded: only the event loop touches it.
    """

    def __init__(self, on_change: Callable[[], None]):
        self.on_change = on_change
        self.heap: list[tuple] = []
        self.running: dict[int, list] = {}
        self.history: dict[str, dict] = {}
        self.flags: dict[str, Any] = {}
        self._task_counter = itertools.count()
        self._sequence = itertools.count()  # breaks ties so equal numbers never compare the prompts
        self._not_empty = asyncio.Event()

    def put(self, item: list):
        heapq.heappush(self.heap, (item[0], item[1], next(self._sequence), item))
        self._not_empty.set()
        self.on_change()

    async def get(self) -> tuple[list, int]:
        while not self.heap:
            self._not_empty.clear()
            await self._not_empty.wait()
        item = heapq.heappop(self.heap)[3]
        task_id = next(self._task_counter)
        self.running[task_id] = copy.deepcopy(item)
        self.on_change()
        return item, task_id

    def task_done(self, task_id: int, history_result: dict, status: dict):
        item = self.running.pop(task_id)
        if len(self.history) > MAXIMUM_HISTORY_SIZE:
            self.history.pop(next(iter(self.history)))
        for key in SENSITIVE_EXTRA_DATA_KEYS:
            item[3].pop(key, None)
        entry = {"prompt": item, "outputs": {}, "status": status}
        entry.update(history_result)
        self.history[item[1]] = entry
        self.on_change()

    def remaining(self) -> int:
        return len(self.heap) + len(self.running)

    def running_items(self) -> list[list]:
        return list(self.running.values())

    def pending_items(self) -> list[list]:
        return [entry[3] for entry in self.heap]  # heap order, like ComfyUI

    def wipe(self):
        self.heap = []
        self.on_change()

    def delete(self, prompt_id) -> bool:
        for index, entry in enumerate(self.heap):
            if entry[1] == prompt_id:
                if len(self.heap) == 1:
                    self.wipe()
                else:
                    self.heap.pop(index)
                    heapq.heapify(self.heap)
                self.on_change()
                return True
        return False

    def get_history(self, prompt_id=None, max_items=None, offset=-1) -> dict:
        if prompt_id is not None:
            return {prompt_id: copy.deepcopy(self.history[prompt_id])} if prompt_id in self.history else {}
        if offset < 0 and max_items is not None:
            offset = len(self.history) - max_items
        out = {}
        for index, key in enumerate(self.history):
            if index >= offset:
                out[key] = self.history[key]
                if max_items is not None and len(out) >= max_items:
                    break
        return out


# ---------------------------------------------------------------------------
# Hostility
# ---------------------------------------------------------------------------

CHAOS_ROUTES = ("/history", "/queue", "/system_stats", "/object_info")


class Chaos:
    """What a production box full of custom node packs does to a client, on
    purpose: messages of any type with any data between the real ones, and
    answers of /history, /queue, /system_stats and /object_info replaced by
    other JSON. Random, but from a seed, so a failing run can be replayed.

    messages: (type, data) pairs to draw from; a data of PROMPT_ID_MARK has
    the running prompt's id put in ("prompt_id"), so known types aimed at a
    real prompt come too. message_rate: chance, before each real message, of
    sending one of them (to every socket). answers: JSON values to draw from;
    answer_rates: route (one of CHAOS_ROUTES) -> chance of answering with one
    of them instead (for /history/<id> also wrapped as {<id>: value}).
    binary: byte strings to send as binary frames, at message_rate too."""

    def __init__(self, *, seed: int = 0, messages=(), message_rate: float = 0.0, answers=(),
                 answer_rates=None, binary=()):
        self.rng = random.Random(seed)
        self.messages = list(messages)
        self.message_rate = message_rate
        self.answers = list(answers)
        self.answer_rates = dict(answer_rates or {})
        self.binary = list(binary)
        self.sent = 0       # junk messages and frames sent
        self.replaced = 0   # answers replaced

    def interjections(self, prompt_id: str | None) -> list:
        out = []
        if self.messages and self.rng.random() < self.message_rate:
            kind, data = self.rng.choice(self.messages)
            if isinstance(data, dict) and data.get("prompt_id") == PROMPT_ID_MARK:
                data = {**data, "prompt_id": prompt_id}
            out.append(json.dumps({"type": kind, "data": data}))
        if self.binary and self.rng.random() < self.message_rate:
            out.append(self.rng.choice(self.binary))
        self.sent += len(out)
        return out

    def answer(self, route: str, prompt_id: str | None):
        """(True, body) to answer with junk, (False, None) to answer for real."""
        if not self.answers or self.rng.random() >= self.answer_rates.get(route, 0.0):
            return False, None
        self.replaced += 1
        body = self.rng.choice(self.answers)
        if prompt_id is not None and self.rng.random() < 0.5:
            body = {prompt_id: body}
        return True, body


PROMPT_ID_MARK = "<the running prompt>"


# ---------------------------------------------------------------------------
# The fake server
# ---------------------------------------------------------------------------

@dataclass(eq=False)  # identity, so connections can live in a set
class _Connection:
    index: int           # position in FakeComfyUI.ws_connects / ws_sent
    sid: str
    ws: web.WebSocketResponse
    flags: dict | None = None  # the client's feature_flags, when its first message sent them


def _json(data, status: int = 200) -> web.Response:
    return web.json_response(data, status=status)  # application/json; charset=utf-8, like ComfyUI


class FakeComfyUI:
    """An in-process ComfyUI 0.3.64 look-alike; see the module docstring.

    Lifecycle: start(host, port) -> url, stop(), restart() (same port, memory
    forgotten), drop_websockets(); app is the aiohttp Application.
    Knobs, changeable at any time: gate(class_type), ungate(), node_delay,
    progress_steps, fail_node, mode, route_modes, latency, ws_close_every.
    Waiting: wait_idle(), wait_flushed(), wait_for_execution_start(),
    wait_for_gated(), wait_until(predicate); started(), gated,
    connected_client_ids.
    Records, kept across restarts (ComfyUI's own state is not):
    posted_prompt_ids, execution_count, interrupt_bodies, queue_delete_ids,
    requests, ws_connects and ws_sent (per connection, in the same order).
    """

    def __init__(self, *, output_dir, input_dir=None, temp_dir=None, object_info=None, version: str = "0.3.64",
                 supports_jobs_cancel: bool = False, models_dir=None, clock: Callable[[], float] = time.time):
        output_dir = Path(output_dir)
        self._dirs = _Dirs(output=output_dir,
                           input=Path(input_dir) if input_dir is not None else output_dir.parent / "input",
                           temp=Path(temp_dir) if temp_dir is not None else output_dir.parent / "temp",
                           models=Path(models_dir) if models_dir is not None else None)
        for folder in (self._dirs.output, self._dirs.input, self._dirs.temp):
            folder.mkdir(parents=True, exist_ok=True)
        if object_info is None:
            object_info = {**json.loads(DEFAULT_OBJECT_INFO.read_text()), **SUPPLEMENTARY_OBJECT_INFO}
        elif not isinstance(object_info, dict):
            object_info = json.loads(Path(object_info).read_text())
        self._catalog = _NodeCatalog(object_info, self._dirs)
        self._validator = _PromptValidator(self._catalog, self._dirs)
        self._nodes = _StandInNodes(self._catalog, self._dirs)
        self.version = version
        self.supports_jobs_cancel = supports_jobs_cancel
        self._clock = clock

        # Knobs.
        self.node_delay: dict[str, float] = {}
        self.progress_steps: dict[str, int] = {}
        self.fail_node: dict[str, tuple[str, str]] = {}
        self._mode = "ok"
        self.latency = 0.0
        self.ws_close_every: float | None = None
        self._gates: dict[str, tuple[asyncio.Event, bool]] = {}
        self.gated: set = set()  # (prompt_id, node_id) of nodes now waiting at a gate
        # Hostility knobs (see Chaos, and the tests of comfymgr's defences).
        self.chaos: Chaos | None = None
        # A fault mode for one route (its path without /api), over `mode`.
        self.route_modes: dict[str, str] = {}
        # Called with each POST /prompt body before it is validated; returning
        # (status, JSON body) answers with that instead (e.g. a proxy's 413);
        # it may be a coroutine, to hold the answer back.
        self.prompt_answer: Callable[[dict], Any] | None = None
        # Seconds the next POSTs spend validating before they are queued (one
        # per POST, first first): ComfyUI's validation can suspend that long.
        self.validation_delays: list[float] = []
        # False: mint ids of its own like ComfyUI servers older than client prompt ids.
        self.honour_prompt_id = True
        # Awaited with the ids of a POST /queue delete before it is carried out.
        self.before_queue_delete: Callable[[list], Any] | None = None
        # Node classes that send a preview image with each progress tick, as
        # samplers do: binary frames to the prompt's client, with metadata
        # (type 4) for a client that announced supports_preview_metadata,
        # else the legacy form (type 1). PNG stand-ins, 8x8, a shade per step.
        self.preview_nodes: set[str] = set()
        self.legacy_previews = False  # True: type 1 frames even to a client that announced metadata
        # prompt id -> what GET /history/<id> answers under that id instead of
        # the real entry (a custom node or a broken server writing odd shapes).
        self.history_entries: dict[str, Any] = {}
        self.previews_sent: list[tuple[int, str, int]] = []  # (frame type, node id, step)

        # Records.
        self.posted_prompt_ids: list[str] = []
        self.execution_count: dict[str, int] = {}
        self.interrupt_bodies: list[Any] = []
        self.queue_delete_ids: list[Any] = []
        self.requests: list[tuple[str, str]] = []
        self.ws_connects: list[str] = []
        self.ws_sent: list[list[dict]] = []  # per connection, every message the server sent it

        self.host: str | None = None
        self.port: int | None = None
        self._runner: web.AppRunner | None = None
        self._changed = asyncio.Event()
        self._reset_process_state()
        self.app = self._build_app()

    # -- knobs and waiting helpers ------------------------------------------------

    @property
    def mode(self) -> str:
        """Fault mode for every route but /__fake__/: one of FAULT_MODES."""
        return self._mode

    @mode.setter
    def mode(self, mode: str):
        if mode not in FAULT_MODES:
            raise ValueError(f"mode must be one of {FAULT_MODES}, not {mode!r}")
        if self._mode == "hang" and mode != "hang":
            # Requests hung so far lose their connection rather than hang forever.
            self._hang_release.set()
            self._hang_release = asyncio.Event()
        self._mode = mode

    @property
    def url(self) -> str | None:
        return f"http://{self.host}:{self.port}" if self.port is not None else None

    def gate(self, class_type: str, *, interruptible: bool = True) -> asyncio.Event:
        """Nodes of class_type wait, after their work, until the returned event is set.

        An interruptible gate gives way to an interrupt at once, like a node that
        reports progress; interruptible=False waits like a blur, so an interrupt
        lands at the next node. Setting then clearing the event lets the nodes now
        waiting go and stops the next ones.
        """
        if class_type not in self._gates:
            self._gates[class_type] = (asyncio.Event(), interruptible)
        return self._gates[class_type][0]

    def ungate(self, class_type: str):
        event, _ = self._gates.pop(class_type, (None, None))
        if event is not None:
            event.set()

    def started(self, prompt_id: str) -> bool:
        return self.execution_count.get(prompt_id, 0) > 0

    @property
    def connected_client_ids(self) -> list[str]:
        """The clientIds messages can reach now (a stolen or dropped id is not among them)."""
        return list(self._sockets)

    async def wait_for_execution_start(self, prompt_id: str, times: int = 1):
        await self.wait_until(lambda: self.execution_count.get(prompt_id, 0) >= times)

    async def wait_for_gated(self, prompt_id: str, node_id: str):
        """Until node_id of prompt_id is waiting at its gate."""
        await self.wait_until(lambda: (prompt_id, node_id) in self.gated)

    async def wait_idle(self):
        """Until nothing is queued or running and every message has gone out."""
        await self.wait_until(lambda: self._queue.remaining() == 0 and self._flushed())

    async def wait_flushed(self):
        """Until every message queued so far has gone out to its sockets."""
        await self.wait_until(self._flushed)

    def _flushed(self) -> bool:
        return self._outbox.empty() and not self._sending

    async def wait_until(self, predicate: Callable[[], bool]):
        """Until predicate() holds; it is checked again on every change of the fake's state."""
        while not predicate():
            await self._changed.wait()

    def _notify(self):
        # Wakes every _wait_until; each checks its predicate again.
        self._changed.set()
        self._changed = asyncio.Event()

    async def _wait_at_gate(self, call: _NodeCall, prompt_id: str):
        event, interruptible = self._gates[call.class_type]
        opened = asyncio.ensure_future(event.wait())
        interrupted = asyncio.ensure_future(self._interrupt.wait())
        # Let both waits register before anyone hears that the node is waiting,
        # so a set() followed at once by clear() still lets it through.
        await asyncio.sleep(0)
        self.gated.add((prompt_id, call.node_id))
        self._notify()
        try:
            await asyncio.wait([opened, interrupted] if interruptible else [opened],
                               return_when=asyncio.FIRST_COMPLETED)
            if not opened.done():
                raise _Interrupted()
        finally:
            opened.cancel()
            interrupted.cancel()
            self.gated.discard((prompt_id, call.node_id))
            self._notify()

    # -- lifecycle ----------------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Serves on host:port (0 picks a free port) and returns the base URL."""
        if self._runner is not None:
            return self.url
        self.app = self._build_app()
        runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        site = web.TCPSite(runner, host, port, reuse_address=True)
        await site.start()
        self._runner = runner
        self.host = host
        self.port = site._server.sockets[0].getsockname()[1]  # the real port when 0 was asked for
        return self.url

    async def stop(self):
        """Closes every socket and stops serving, like killing the process."""
        if self._runner is None:
            return
        runner, self._runner = self._runner, None
        await runner.cleanup()

    async def restart(self):
        """A ComfyUI process restart: queue, history and caches forgotten, same port."""
        host, port = self.host, self.port
        await self.stop()
        await self.start(host or "127.0.0.1", port or 0)

    async def drop_websockets(self):
        """Closes every WebSocket now; prompts keep running and unheard messages are lost."""
        for conn in list(self._connections):
            await conn.ws.close(code=WSCloseCode.GOING_AWAY, message=b"Server shutdown")

    def _reset_process_state(self):
        """What a ComfyUI process holds in memory, as a fresh process has it."""
        self._queue = _PromptQueue(self._queue_updated)
        self._executor = _PromptExecutor(self)
        self._number = 0
        self._client_id: str | None = None  # client of the prompt running or last run
        self._last_node_id: str | None = None
        self._interrupt = asyncio.Event()
        self._sockets: dict[str, _Connection] = {}
        self._connections: set = set()
        self._outbox: asyncio.Queue = asyncio.Queue()
        self._sending = False
        self._hang_release = asyncio.Event()

    async def _on_shutdown(self, app: web.Application):
        self._hang_release.set()
        await self.drop_websockets()

    async def _soft_restart(self):
        """For /__fake__/restart: forget everything while the listener stays up."""
        await self.drop_websockets()
        for task in (self._publisher_task, self._worker_task):
            task.cancel()
        await asyncio.gather(self._publisher_task, self._worker_task, return_exceptions=True)
        self._hang_release.set()
        self._reset_process_state()
        self._start_background_tasks()
        self._notify()

    # -- messages -----------------------------------------------------------------

    def _send(self, event: str, data: dict, sid: str | None = None):
        """Queues a message for sid, or for every socket when sid is None (ComfyUI's send_sync)."""
        if self.chaos is not None:
            running = self._running_prompt_ids()
            for junk in self.chaos.interjections(running[0] if running else None):
                self._outbox.put_nowait((junk, None))
        message = {"type": event, "data": data}
        self._outbox.put_nowait((json.dumps(message), sid))

    def _send_preview(self, prompt_id: str, node_id: str, step: int):
        sid = self._client_id
        conn = self._sockets.get(sid) if sid is not None else None
        if conn is None:
            return  # ComfyUI sends previews to the prompt's client only
        image = _png_bytes(8, 8, (step * 16 % 256, 64, 255 - step * 16 % 256), [])
        if (conn.flags or {}).get("supports_preview_metadata") and not self.legacy_previews:
            metadata = json.dumps({"node_id": node_id, "prompt_id": prompt_id, "display_node_id": node_id,
                                   "parent_node_id": None, "real_node_id": node_id,
                                   "image_type": "image/png"}).encode()
            frame = struct.pack(">II", 4, len(metadata)) + metadata + image
            kind = 4
        else:
            frame = struct.pack(">II", 1, 2) + image
            kind = 1
        self.previews_sent.append((kind, node_id, step))
        self._outbox.put_nowait((frame, sid))

    def broadcast(self, event: str, data: Any, sid: str | None = None):
        """What a custom node does with PromptServer.instance.send_sync(event, data, sid):
        any event name, any JSON data, to every socket (or one)."""
        self._outbox.put_nowait((json.dumps({"type": event, "data": data}), sid))

    def send_binary(self, frame: bytes, sid: str | None = None):
        """A binary frame as ComfyUI's send_bytes sends it (previews), to sid or everyone."""
        self._outbox.put_nowait((bytes(frame), sid))

    def _queue_updated(self):
        self._send("status", {"status": self._queue_info()})
        self._notify()

    def _queue_info(self) -> dict:
        return {"exec_info": {"queue_remaining": self._queue.remaining()}}

    async def _publish_loop(self):
        # Recipients are looked up when a message goes out, not when it was
        # queued: a socket that connects or steals a clientId in between hears it.
        while True:
            text, sid = await self._outbox.get()
            self._sending = True
            if sid is None:
                targets = list(self._sockets.values())
            else:
                targets = [self._sockets[sid]] if sid in self._sockets else []
            for conn in targets:
                await self._send_to(conn, text)
            self._sending = False
            if self._outbox.empty():
                self._notify()

    async def _send_to(self, conn: _Connection, text):
        try:
            if isinstance(text, bytes):
                await conn.ws.send_bytes(text)
            else:
                await conn.ws.send_str(text)
        except Exception:
            return
        self.ws_sent[conn.index].append({"binary": len(text)} if isinstance(text, bytes) else json.loads(text))

    async def _ws_handler(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        # This process lifetime's registries: after a restart in place, the old
        # socket's cleanup must not touch the new ones.
        sockets, connections = self._sockets, self._connections
        sid = request.rel_url.query.get("clientId", "")
        if sid:
            sockets.pop(sid, None)  # a reconnect with the same id steals the stream
        else:
            sid = uuid.uuid4().hex
        conn = _Connection(len(self.ws_connects), sid, ws)
        self.ws_connects.append(sid)
        self.ws_sent.append([])
        sockets[sid] = conn
        connections.add(conn)
        self._notify()
        closer = None
        if self.ws_close_every:
            closer = asyncio.ensure_future(self._close_later(ws, self.ws_close_every))
        try:
            await self._send_to(conn, json.dumps({"type": "status", "data": {"status": self._queue_info(), "sid": sid}}))
            if self._client_id == sid and self._last_node_id is not None:
                await self._send_to(conn, json.dumps({"type": "executing", "data": {"node": self._last_node_id}}))
            first_message = True
            async for msg in ws:
                if msg.type != WSMsgType.TEXT:
                    continue
                try:
                    data = json.loads(msg.data)
                except ValueError:
                    continue
                if not isinstance(data, dict):
                    continue
                if first_message and data.get("type") == "feature_flags":
                    conn.flags = data.get("data") if isinstance(data.get("data"), dict) else {}
                    await self._send_to(conn, json.dumps({"type": "feature_flags", "data": dict(SERVER_FEATURES)}))
                first_message = False
        finally:
            # ComfyUI drops whatever is registered under sid, even a newer socket.
            sockets.pop(sid, None)
            connections.discard(conn)
            self._notify()
            if closer is not None:
                closer.cancel()
        return ws

    @staticmethod
    async def _close_later(ws: web.WebSocketResponse, delay: float):
        await asyncio.sleep(delay)
        await ws.close(code=WSCloseCode.GOING_AWAY, message=b"Server shutdown")

    # -- the worker ---------------------------------------------------------------

    async def _worker_loop(self):
        """main.py's prompt_worker: one prompt at a time, in queue order."""
        while True:
            item, task_id = await self._queue.get()
            _number, prompt_id, prompt, extra_data, outputs = item
            executor = self._executor
            try:
                await executor.execute(prompt, prompt_id, extra_data, outputs)
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug here must not wedge the queue: record a failed run
                log.exception("fake executor failed on %s", prompt_id)
                executor.success = False
            status = {"status_str": "success" if executor.success else "error", "completed": executor.success,
                      "messages": copy.deepcopy(executor.status_messages)}
            self._queue.task_done(task_id, executor.history_result, status)
            if self._client_id is not None:
                self._send("executing", {"node": None, "prompt_id": prompt_id}, self._client_id)
            flags, self._queue.flags = self._queue.flags, {}
            if flags.get("free_memory"):
                executor.reset()
            self._notify()

    def _count_execution_start(self, prompt_id: str):
        self.execution_count[prompt_id] = self.execution_count.get(prompt_id, 0) + 1
        self._notify()

    def _check_interrupt(self):
        if self._interrupt.is_set():
            raise _Interrupted()

    def _running_prompt_ids(self) -> list[str]:
        return [item[1] for item in self._queue.running_items()]

    # -- HTTP: middleware and app -------------------------------------------------

    def _build_app(self) -> web.Application:
        app = web.Application(client_max_size=SERVER_FEATURES["max_upload_size"],
                              middlewares=[self._fault_middleware, self._origin_only_middleware])
        routes = [
            ("GET", "/ws", self._ws_handler),
            ("GET", "/", self._index),
            ("GET", "/embeddings", self._get_embeddings),
            ("GET", "/models", self._get_models),
            ("GET", "/models/{folder}", self._get_model_folder),
            ("POST", "/upload/image", self._post_upload_image),
            ("GET", "/view", self._get_view),
            ("GET", "/system_stats", self._get_system_stats),
            ("GET", "/features", self._get_features),
            ("GET", "/prompt", self._get_prompt),
            ("GET", "/object_info", self._get_object_info),
            ("GET", "/object_info/{node_class}", self._get_object_info_node),
            ("GET", "/history", self._get_history),
            ("GET", "/history/{prompt_id}", self._get_history_prompt),
            ("GET", "/queue", self._get_queue),
            ("POST", "/prompt", self._post_prompt),
            ("POST", "/queue", self._post_queue),
            ("POST", "/interrupt", self._post_interrupt),
            ("POST", "/free", self._post_free),
            ("POST", "/history", self._post_history),
        ]
        if self.supports_jobs_cancel:
            routes.append(("POST", "/jobs/{prompt_id}/cancel", self._post_job_cancel))
        for prefix in ("/api", ""):  # ComfyUI serves every route twice
            for method, path, handler in routes:
                if prefix and path == "/":
                    continue
                if method == "GET":
                    app.router.add_get(prefix + path, handler)  # answers HEAD too, as ComfyUI's routes do
                else:
                    app.router.add_route(method, prefix + path, handler)
        app.router.add_get("/__fake__/stats", self._fake_stats)
        app.router.add_post("/__fake__/mode", self._fake_mode)
        app.router.add_post("/__fake__/restart", self._fake_restart)
        app.router.add_post("/__fake__/drop_websockets", self._fake_drop_websockets)
        app.cleanup_ctx.append(self._background_tasks)
        app.on_shutdown.append(self._on_shutdown)
        return app

    def _start_background_tasks(self):
        self._publisher_task = asyncio.ensure_future(self._publish_loop())
        self._worker_task = asyncio.ensure_future(self._worker_loop())

    async def _background_tasks(self, app: web.Application):
        # One process lifetime: state is fresh at startup; the publisher and the
        # worker are the only tasks, started and cancelled here.
        self._reset_process_state()
        self._start_background_tasks()
        yield
        for task in (self._publisher_task, self._worker_task):
            task.cancel()
        await asyncio.gather(self._publisher_task, self._worker_task, return_exceptions=True)
        self._notify()

    @web.middleware
    async def _fault_middleware(self, request: web.Request, handler):
        if request.path.startswith("/__fake__/"):
            return await handler(request)
        self.requests.append((request.method, request.path))
        if self.latency:
            await asyncio.sleep(self.latency)
        mode = self.route_modes.get(request.path.removeprefix("/api"), self.mode)
        if mode == "hang":
            await request.read()
            await self._hang_release.wait()
            if request.transport is not None:
                request.transport.abort()
            raise asyncio.CancelledError()
        if mode == "http500":
            return web.Response(status=500, text=ERROR_500_TEXT)
        if mode == "html":
            return web.Response(text=HTML_PAGE, content_type="text/html")
        if mode == "truncated":
            return web.Response(body=TRUNCATED_JSON, content_type="application/json", charset="utf-8")
        if self.chaos is not None and request.method == "GET":
            path = request.path.removeprefix("/api")
            route = next((r for r in CHAOS_ROUTES if path == r or path.startswith(r + "/")), None)
            if route is not None:
                prompt_id = path[len("/history/"):] if path.startswith("/history/") else None
                replaced, body = self.chaos.answer(route, prompt_id)
                if replaced:
                    return web.Response(text=json.dumps(body), content_type="application/json")
        return await handler(request)

    @web.middleware
    async def _origin_only_middleware(self, request: web.Request, handler):
        # ComfyUI refuses a browser's cross-site POST to a loopback server.
        host, origin = request.headers.get("Host"), request.headers.get("Origin")
        if host and origin:
            parsed_origin = urlparse(origin)
            parsed_host = urlsplit("//" + host.lower())
            host_name = host.lower() if parsed_origin.port is not None else parsed_host.hostname
            origin_name = parsed_origin.netloc.lower() if parsed_host.port is not None else parsed_origin.hostname
            if _is_loopback(parsed_host.hostname) and host_name and origin_name and host_name != origin_name:
                return web.Response(status=403)
        if request.method == "OPTIONS":
            return web.Response()
        return await handler(request)

    # -- HTTP: prompts, queue, history --------------------------------------------

    async def _post_prompt(self, request: web.Request) -> web.Response:
        json_data = await request.json()
        if "number" in json_data:
            number = float(json_data["number"])
        else:
            number = self._number
            if json_data.get("front"):
                number = -number
            self._number += 1
        if "prompt" not in json_data:
            return _json({"error": _error("no_prompt", "No prompt provided", "No prompt provided"), "node_errors": {}}, 400)
        if self.prompt_answer is not None:
            answer = self.prompt_answer(json_data)
            if inspect.isawaitable(answer):  # an answer the test holds back
                answer = await answer
            if answer is not None:
                return _json(answer[1], answer[0])
        prompt = json_data["prompt"]
        prompt_id = str(json_data.get("prompt_id", uuid.uuid4()))
        if not self.honour_prompt_id:
            prompt_id = str(uuid.uuid4())
        if self.validation_delays:
            await asyncio.sleep(self.validation_delays.pop(0))
        valid, error, outputs, node_errors = self._validator.validate(prompt, json_data.get("partial_execution_targets"))
        extra_data = json_data.get("extra_data", {})
        if "client_id" in json_data:
            extra_data["client_id"] = json_data["client_id"]
        if not valid:
            return _json({"error": error, "node_errors": node_errors}, 400)
        self._queue.put([number, prompt_id, prompt, extra_data, outputs])
        self.posted_prompt_ids.append(prompt_id)
        return _json({"prompt_id": prompt_id, "number": number, "node_errors": node_errors})

    async def _get_prompt(self, request):
        return _json(self._queue_info())

    async def _get_queue(self, request):
        return _json({"queue_running": self._queue.running_items(), "queue_pending": self._queue.pending_items()})

    async def _post_queue(self, request):
        json_data = await request.json()
        if self.before_queue_delete is not None and json_data.get("delete"):
            await self.before_queue_delete(list(json_data["delete"]))
        if json_data.get("clear"):
            self._queue.wipe()
        for prompt_id in json_data.get("delete", []):
            self.queue_delete_ids.append(prompt_id)
            self._queue.delete(prompt_id)  # a running prompt is not in the heap: silently nothing
        return web.Response(status=200)

    async def _post_interrupt(self, request):
        try:
            json_data = await request.json()
        except ValueError:
            json_data = {}
        self.interrupt_bodies.append(json_data)
        # A body that is not an object counts as none (ComfyUI would fail with a 500).
        prompt_id = json_data.get("prompt_id") if isinstance(json_data, dict) else None
        if not prompt_id or prompt_id in self._running_prompt_ids():
            self._interrupt.set()
        return web.Response(status=200)

    async def _post_job_cancel(self, request):
        # Modelled, not recorded: newer servers offer POST /api/jobs/{id}/cancel
        # (server.py cancel_job_by_id). A running job is interrupted, a pending
        # one dequeued; a finished or unknown id is a no-op. It is idempotent:
        # always 200 with {"cancelled": true} when a cancel was dispatched,
        # {"cancelled": false} otherwise.
        prompt_id = request.match_info["prompt_id"]
        if prompt_id in self._running_prompt_ids():
            self._interrupt.set()
            cancelled = True
        else:
            cancelled = self._queue.delete(prompt_id)
        return _json({"cancelled": bool(cancelled)})

    async def _get_history(self, request):
        query = request.rel_url.query
        max_items = int(query["max_items"]) if "max_items" in query else None
        offset = int(query["offset"]) if "offset" in query else -1
        return _json(self._queue.get_history(max_items=max_items, offset=offset))

    async def _get_history_prompt(self, request):
        prompt_id = request.match_info["prompt_id"]
        if prompt_id in self.history_entries and prompt_id in self._queue.history:
            return _json({prompt_id: self.history_entries[prompt_id]})
        return _json(self._queue.get_history(prompt_id=prompt_id))

    async def _post_history(self, request):
        json_data = await request.json()
        if json_data.get("clear"):
            self._queue.history = {}
        for prompt_id in json_data.get("delete", []):
            self._queue.history.pop(prompt_id, None)
        return web.Response(status=200)

    async def _post_free(self, request):
        json_data = await request.json()
        for flag in ("unload_models", "free_memory"):
            if json_data.get(flag):
                self._queue.flags[flag] = json_data[flag]
        if self._queue.remaining() == 0 and self._queue.flags.pop("free_memory", False):
            self._executor.reset()  # an idle worker acts on the flag at once
        return web.Response(status=200)

    # -- HTTP: files --------------------------------------------------------------

    async def _post_upload_image(self, request):
        post = await request.post()
        image = post.get("image")
        overwrite = post.get("overwrite")
        upload_type = post.get("type") or "input"
        upload_dir = self._dirs.by_type(upload_type)
        if upload_dir is None:
            return web.Response(status=500, text=ERROR_500_TEXT)  # ComfyUI trips over an unknown type
        if not (image is not None and getattr(image, "file", None)):
            return web.Response(status=400)
        filename = image.filename
        if not filename:
            return web.Response(status=400)
        content = image.file.read()
        subfolder = post.get("subfolder", "")
        base = os.path.abspath(str(upload_dir))
        folder = os.path.join(base, os.path.normpath(subfolder))
        filepath = os.path.abspath(os.path.join(folder, filename))
        if os.path.commonpath((base, filepath)) != base:
            return web.Response(status=400)
        os.makedirs(folder, exist_ok=True)
        stem, extension = os.path.splitext(filename)
        duplicate = False
        if overwrite not in ("true", "1"):
            counter = 1
            while os.path.exists(filepath):
                # Same bytes under the same name: ComfyUI answers with the existing file.
                if hashlib.sha256(Path(filepath).read_bytes()).digest() == hashlib.sha256(content).digest():
                    duplicate = True
                    break
                filename = f"{stem} ({counter}){extension}"
                filepath = os.path.join(folder, filename)
                counter += 1
        if not duplicate:
            Path(filepath).write_bytes(content)
        return _json({"name": filename, "subfolder": subfolder, "type": upload_type})

    async def _get_view(self, request):
        query = request.rel_url.query
        if "filename" not in query:
            return web.Response(status=404)
        name, annotated_dir = self._dirs.split_annotation(query["filename"])
        if not name:
            return web.Response(status=400)
        if name[0] == "/" or ".." in name:
            return web.Response(status=400)
        folder = annotated_dir or self._dirs.by_type(query.get("type", "output"))
        if folder is None:
            return web.Response(status=400)
        folder = os.path.abspath(str(folder))
        if "subfolder" in query:
            full = os.path.join(folder, query["subfolder"])
            # Like ComfyUI, this does not resolve symlinks (ComfyUI issue #12285).
            if os.path.commonpath((os.path.abspath(full), folder)) != folder:
                return web.Response(status=403)
            folder = full
        name = os.path.basename(name)
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            return web.Response(status=404)
        # ?preview= and ?channel= need Pillow on a real server; the file is served as it is.
        content_type = mimetypes.guess_type(name)[0] or "application/octet-stream"
        if content_type in {"text/html", "text/html-sandboxed", "application/xhtml+xml", "text/javascript", "text/css"}:
            content_type = "application/octet-stream"
        return web.FileResponse(path, headers={"Content-Disposition": f'filename="{name}"', "Content-Type": content_type})

    # -- HTTP: server information -------------------------------------------------

    async def _index(self, request):
        return web.Response(text="<!DOCTYPE html><html><head><title>ComfyUI</title></head><body></body></html>",
                            content_type="text/html")

    async def _get_system_stats(self, request):
        stats = json.loads((HTTP_DATA_DIR / "system_stats.json").read_text())
        stats["system"]["comfyui_version"] = self.version
        stats["system"]["python_version"] = sys.version
        stats["system"]["argv"] = ["main.py", "--listen", self.host or "127.0.0.1", "--port", str(self.port or 8188),
                                   "--output-directory", str(self._dirs.output), "--input-directory",
                                   str(self._dirs.input), "--temp-directory", str(self._dirs.temp),
                                   "--disable-auto-launch"]
        return _json(stats)

    async def _get_features(self, request):
        return _json(dict(SERVER_FEATURES))

    async def _get_object_info(self, request):
        return _json(self._catalog.all_info())

    async def _get_object_info_node(self, request):
        node_class = request.match_info["node_class"]
        return _json({node_class: self._catalog.info(node_class)} if self._catalog.has(node_class) else {})

    def _model_folders(self) -> list[str]:
        return json.loads((HTTP_DATA_DIR / "models.json").read_text())

    async def _get_models(self, request):
        return _json(self._model_folders())

    async def _get_model_folder(self, request):
        folder = request.match_info["folder"]
        if folder not in self._model_folders():
            return web.Response(status=404)
        return _json(_model_files(self._dirs.models / folder) if self._dirs.models is not None else [])

    async def _get_embeddings(self, request):
        if self._dirs.models is None:
            return _json([])
        return _json([os.path.splitext(name)[0] for name in _model_files(self._dirs.models / "embeddings")])

    # -- control API for other processes ------------------------------------------

    async def _fake_stats(self, request):
        history = {pid: entry["status"] for pid, entry in self._queue.history.items()}
        return _json({"posted_prompt_ids": self.posted_prompt_ids, "execution_count": self.execution_count,
                      "history": history, "queue_running": self._running_prompt_ids(),
                      "queue_pending": [item[1] for item in self._queue.pending_items()],
                      "mode": self.mode, "ws_connects": self.ws_connects})

    async def _fake_mode(self, request):
        json_data = await request.json()
        mode = json_data.get("mode", self.mode)
        if mode not in FAULT_MODES:
            return _json({"error": f"mode must be one of {list(FAULT_MODES)}"}, 400)
        self.mode = mode
        if "latency" in json_data:
            self.latency = float(json_data["latency"])
        if "ws_close_every" in json_data:
            self.ws_close_every = json_data["ws_close_every"]
        return _json({"mode": self.mode, "latency": self.latency, "ws_close_every": self.ws_close_every})

    async def _fake_restart(self, request):
        # The listener cannot stop inside one of its own requests, so this
        # forgets everything in place: the same as a restart for any client
        # that reconnects afterwards.
        await self._soft_restart()
        return _json({"restarted": True})

    async def _fake_drop_websockets(self, request):
        await self.drop_websockets()
        return _json({"dropped": True})


def _is_loopback(host: str | None) -> bool:
    if not host:
        return False
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        addresses = [info[4][0] for info in socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)]
    except socket.gaierror:
        return False
    return bool(addresses) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses)


# ---------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------

def _parse_pairs(pairs: list[str], convert) -> dict[str, Any]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"expected CLASS=VALUE, got {pair!r}")
        out[key] = convert(value)
    return out


async def _serve(args) -> None:
    fake = FakeComfyUI(output_dir=args.output_dir, input_dir=args.input_dir, temp_dir=args.temp_dir,
                       models_dir=args.models_dir, version=args.version,
                       supports_jobs_cancel=args.supports_jobs_cancel)
    fake.node_delay.update(_parse_pairs(args.node_delay, float))
    fake.progress_steps.update(_parse_pairs(args.progress_steps, int))
    await fake.start(args.host, args.port)
    print(f"listening on {fake.url}", flush=True)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(signum, stopping.set)
        except (NotImplementedError, RuntimeError):
            pass
    await stopping.wait()
    await fake.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="A fake ComfyUI server for comfymgr's tests.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8188, help="0 picks a free port")
    parser.add_argument("--output-dir", required=True, type=Path)
    parser.add_argument("--input-dir", type=Path)
    parser.add_argument("--temp-dir", type=Path)
    parser.add_argument("--models-dir", type=Path)
    parser.add_argument("--version", default="0.3.64", help="comfyui_version in /system_stats")
    parser.add_argument("--supports-jobs-cancel", action="store_true", help="serve POST /api/jobs/{id}/cancel")
    parser.add_argument("--node-delay", action="append", default=[], metavar="CLASS=SECONDS")
    parser.add_argument("--progress-steps", action="append", default=[], metavar="CLASS=N")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        asyncio.run(_serve(args))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
