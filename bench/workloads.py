"""The workflows the suite sends. All of them pass comfymgr's submit-time
checks against the recorded /object_info subset the fake ComfyUI serves."""

from __future__ import annotations

import json
from typing import Any

WORKFLOW_BYTES = 20_000


def big_workflow(target_bytes: int = WORKFLOW_BYTES) -> dict[str, Any]:
    """A realistic ~20 KB API-format graph: a checkpoint, a LoRA stack, long
    prompts, four sampler/decode/save branches; the prompt text is padded so
    that the JSON is `target_bytes` long (what a UI's 'Save (API)' sends for
    a mid-sized graph)."""
    wf: dict[str, Any] = {"1": {"class_type": "CheckpointLoaderSimple",
                                "inputs": {"ckpt_name": "sd_xl_base_1.0.safetensors"}}}
    model, clip = ["1", 0], ["1", 1]
    for i in range(8):
        nid = str(10 + i)
        wf[nid] = {"class_type": "LoraLoader", "inputs": {
            "model": model, "clip": clip, "lora_name": f"style_{i:02d}.safetensors",
            "strength_model": 0.6, "strength_clip": 0.6}}
        model, clip = [nid, 0], [nid, 1]
    wf["30"] = {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": clip}}
    wf["31"] = {"class_type": "CLIPTextEncode", "inputs": {
        "text": "blurry, low quality, watermark, text, deformed hands, extra fingers", "clip": clip}}
    for b in range(4):
        base = 40 + 10 * b
        wf[str(base)] = {"class_type": "EmptyLatentImage",
                         "inputs": {"width": 1024, "height": 1024, "batch_size": 1}}
        wf[str(base + 1)] = {"class_type": "KSampler", "inputs": {
            "model": model, "seed": 156680208700286 + b, "steps": 30, "cfg": 7.0,
            "sampler_name": "euler", "scheduler": "karras", "positive": ["30", 0],
            "negative": ["31", 0], "latent_image": [str(base), 0], "denoise": 1.0}}
        wf[str(base + 2)] = {"class_type": "VAEDecode",
                             "inputs": {"samples": [str(base + 1), 0], "vae": ["1", 2]}}
        wf[str(base + 3)] = {"class_type": "SaveImage",
                             "inputs": {"images": [str(base + 2), 0], "filename_prefix": f"bench_{b}"}}
    words = ("a highly detailed photograph of a lighthouse on a rocky coast at dusk, volumetric "
             "light, dramatic clouds, 35mm, kodak portra 400, film grain, ").split()
    body_len = len(json.dumps({"workflow": wf}))
    text, i = [], 0
    while body_len + len(" ".join(text)) < target_bytes:
        text.append(words[i % len(words)])
        i += 1
    wf["30"]["inputs"]["text"] = " ".join(text)[: max(0, target_bytes - body_len)]
    return wf


def quick_workflow(i: int) -> dict[str, Any]:
    """The simplest real job: an 8x8 image saved. The color differs per job,
    so ComfyUI's output cache never skips the run. Files go to a subfolder
    per 500 jobs: SaveImage lists its folder to number the file (ComfyUI
    does too), which would make every job slower than the one before."""
    return {"1": {"class_type": "EmptyImage",
                  "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": i % 16_777_216}},
            "2": {"class_type": "SaveImage",
                  "inputs": {"images": ["1", 0], "filename_prefix": f"q/{i // 500}/q"}}}


def gate_workflow(i: int = 0) -> dict[str, Any]:
    """A job that waits at the fake's ImageBlur gate until the suite opens it:
    keeps the backend busy while a queue is filled."""
    return {"1": {"class_type": "EmptyImage",
                  "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": i % 16_777_216}},
            "2": {"class_type": "ImageBlur", "inputs": {"image": ["1", 0], "blur_radius": 1, "sigma": 1.0}},
            "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "g"}}}


def timed_workflow(i: int) -> dict[str, Any]:
    """quick_workflow with an ImageInvert between: a job as long as the fake's
    --node-delay ImageInvert=S makes it."""
    wf = quick_workflow(i)
    wf["3"] = {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}}
    wf["2"]["inputs"]["images"] = ["3", 0]
    return wf
