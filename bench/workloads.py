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


# -- graphs by size (figure 1) --------------------------------------------------------
# What a UI's "Save (API)" sends as graphs grow: a txt2img graph of 27 nodes
# (big_workflow), then the same pipeline with a longer LoRA stack and more
# branches, each branch an own prompt pair, a sampler, a decode, a resize, a
# touch-up and a save, as batch or comparison graphs are built. Every class is
# in the recorded /object_info subset the fake serves, so comfymgr's
# submit-time check walks the whole graph, links and all.

GRAPH_SIZES = ((27, 20_000), (200, 40_000), (1_000, 200_000))
# The event-loop figure's graph: 10 MB, just under COMFYMGR_MAX_BODY_BYTES'
# default (10 MiB), of 10,000 nodes with long prompts (1 KB a node): the
# stdlib parses it in about 50 ms on the suite's machine, so what comfymgr
# adds on top shows. (40,000 short nodes in 10 MB take 250 ms to parse alone.)
BIG_GRAPH = (10_000, 10_000_000)

_BRANCH = 8  # nodes per branch of graph_workflow
_WORDS = ("a highly detailed photograph of a lighthouse on a rocky coast at dusk, volumetric "
          "light, dramatic clouds, 35mm, kodak portra 400, film grain,").split()


def graph_workflow(nodes: int, target_bytes: int) -> dict[str, Any]:
    """An API-format graph of exactly `nodes` nodes whose request body
    ({"workflow": ...}) is `target_bytes` long, give or take a few bytes:
    a checkpoint, a VAE, a LoRA stack, then branches of 8 nodes (positive and
    negative CLIPTextEncode, EmptyLatentImage, KSampler, VAEDecode,
    ImageScale, ImageInvert, SaveImage); the positive prompts carry the text
    that makes up the size. 27 nodes is big_workflow itself."""
    if nodes == 27:
        return big_workflow(target_bytes)
    if nodes < 4 + _BRANCH:
        raise ValueError(f"a graph of {nodes} nodes is smaller than one branch")
    branches = (nodes - 2) // (_BRANCH + 2)  # room for about two LoRAs per branch
    loras = nodes - 2 - branches * _BRANCH
    wf: dict[str, Any] = {"1": {"class_type": "CheckpointLoaderSimple",
                                "inputs": {"ckpt_name": "sd_xl_base_1.0.safetensors"}},
                          "2": {"class_type": "VAELoader", "inputs": {"vae_name": "pixel_space"}}}
    model, clip = ["1", 0], ["1", 1]
    nid = 3
    for i in range(loras):
        wf[str(nid)] = {"class_type": "LoraLoader", "inputs": {
            "model": model, "clip": clip, "lora_name": f"style_{i % 100:02d}.safetensors",
            "strength_model": round(0.3 + (i % 7) / 10, 2), "strength_clip": 0.6}}
        model, clip = [str(nid), 0], [str(nid), 1]
        nid += 1
    prompts = []
    for b in range(branches):
        pos, neg, latent, sampler, decode, scale, invert, save = (str(nid + k) for k in range(_BRANCH))
        nid += _BRANCH
        wf[pos] = {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": clip}}
        wf[neg] = {"class_type": "CLIPTextEncode", "inputs": {
            "text": "blurry, low quality, watermark, text, deformed hands", "clip": clip}}
        wf[latent] = {"class_type": "EmptyLatentImage",
                      "inputs": {"width": 1024, "height": 1024, "batch_size": 1}}
        wf[sampler] = {"class_type": "KSampler", "inputs": {
            "model": model, "seed": 156680208700286 + b, "steps": 30, "cfg": 7.0,
            "sampler_name": "euler", "scheduler": "karras", "positive": [pos, 0],
            "negative": [neg, 0], "latent_image": [latent, 0], "denoise": 1.0}}
        wf[decode] = {"class_type": "VAEDecode", "inputs": {"samples": [sampler, 0], "vae": ["2", 0]}}
        wf[scale] = {"class_type": "ImageScale", "inputs": {
            "image": [decode, 0], "upscale_method": "bilinear", "width": 1536, "height": 1536,
            "crop": "disabled"}}
        wf[invert] = {"class_type": "ImageInvert", "inputs": {"image": [scale, 0]}}
        wf[save] = {"class_type": "SaveImage", "inputs": {"images": [invert, 0],
                                                          "filename_prefix": f"batch/{b:05d}"}}
        prompts.append(pos)
    assert len(wf) == nodes, (len(wf), nodes)
    spare = target_bytes - len(json.dumps({"workflow": wf}))
    if spare > 0:
        # The same words spread over every positive prompt, each one a
        # little different, as a batch of prompt variations is.
        each, extra = divmod(spare, len(prompts))
        for k, pos in enumerate(prompts):
            want = each + (1 if k < extra else 0)
            words, i = [], k
            while sum(map(len, words)) + len(words) < want:
                words.append(_WORDS[i % len(_WORDS)])
                i += 1
            wf[pos]["inputs"]["text"] = " ".join(words)[:want]
    return wf


def real_job(i: int, prefix: str) -> dict[str, Any]:
    """The simplest job for a real ComfyUI: EmptyImage 64x64 -> SaveImage,
    a fresh color each time so that its cache never serves it; files in a
    subfolder per 200 jobs (SaveImage lists its folder to number the file)."""
    return {"1": {"class_type": "EmptyImage",
                  "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": (i * 7919) % 16_777_216}},
            "2": {"class_type": "SaveImage",
                  "inputs": {"images": ["1", 0], "filename_prefix": f"{prefix}/{i // 200}/b"}}}
