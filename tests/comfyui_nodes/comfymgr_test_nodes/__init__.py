"""Custom nodes for comfymgr's contract tests against a real ComfyUI.

Install: copy (or symlink) this folder into ComfyUI's custom_nodes/ and
restart ComfyUI; `make contract` then runs the scenarios that need them
(they skip, saying so, when ComfyUI does not list these nodes).

- ComfymgrChatter behaves like the node packs on production boxes that
  broadcast messages of their own through PromptServer.send_sync while a
  prompt runs: types nobody else knows, and known types with data of the
  wrong shape (text, a list, a number, null).
- ComfymgrPreviewSteps reports progress with a preview image per step, the
  way samplers send their latent previews (comfy.utils.ProgressBar with a
  ("JPEG", image, 512) preview).
"""

import time

import comfy.utils
import numpy as np
from PIL import Image
from server import PromptServer

CHATTER = [
    ("comfymgr.test.text", "some text"),
    ("comfymgr.test.list", [1, "two", None]),
    ("comfymgr.test.number", 42),
    ("comfymgr.test.null", None),
    ("comfymgr.test.object", {"nested": {"deeper": [1, 2, {"x": None}]}}),
    ("status", "not an object"),
    ("progress", [1, 2, 3]),
    ("executed", 7),
    ("execution_cached", None),
]


class ComfymgrChatter:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": ("IMAGE",), "rounds": ("INT", {"default": 3, "min": 1, "max": 100})}}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "run"
    CATEGORY = "comfymgr/test"

    def run(self, image, rounds):
        for _ in range(rounds):
            for event, data in CHATTER:
                PromptServer.instance.send_sync(event, data)
            time.sleep(0.05)
        return (image,)


class ComfymgrPreviewSteps:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": ("IMAGE",),
                             "steps": ("INT", {"default": 10, "min": 1, "max": 1000}),
                             "seconds_per_step": ("FLOAT", {"default": 0.2, "min": 0.0, "max": 10.0})}}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "run"
    CATEGORY = "comfymgr/test"

    def run(self, image, steps, seconds_per_step):
        pixels = (image[0].cpu().numpy() * 255).clip(0, 255).astype(np.uint8)
        base = Image.fromarray(pixels)
        bar = comfy.utils.ProgressBar(steps)
        for step in range(1, steps + 1):
            time.sleep(seconds_per_step)
            # A preview that changes with each step, as a sampler's does.
            shade = Image.new("RGB", base.size, (step * 255 // steps, 64, 255 - step * 255 // steps))
            preview = Image.blend(base.convert("RGB"), shade, 0.5)
            bar.update_absolute(step, steps, ("JPEG", preview, 512))
        return (image,)


NODE_CLASS_MAPPINGS = {"ComfymgrChatter": ComfymgrChatter, "ComfymgrPreviewSteps": ComfymgrPreviewSteps}
NODE_DISPLAY_NAME_MAPPINGS = {"ComfymgrChatter": "comfymgr test: chatter",
                              "ComfymgrPreviewSteps": "comfymgr test: previews"}
