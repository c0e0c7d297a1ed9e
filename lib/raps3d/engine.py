"""The model at inference time: encode a frame, decode prompts, one forward pass at a time."""

from __future__ import annotations

import contextlib
import threading

import numpy as np
import torch

from .geometry import Frame, frame_image
from .modeling import ImageFeatures, Raps3D


class Engine:
    """Wraps a Raps3D network for inference on one device.

    Forward passes are serialised by one lock: on a CPU server they would only compete for the same cores, and on a
    GPU the lock keeps peak memory predictable.
    """

    def __init__(self, model: Raps3D, device: str | torch.device = "cpu", bf16: bool = False):
        dtype = next(model.parameters()).dtype
        if dtype != torch.float32:
            # Inputs are fp32; half-precision inference is bf16=True (autocast over fp32 weights).
            raise ValueError(f"the model's weights are {dtype}: give Engine fp32 weights (model.float()), and "
                             "bf16=True for bfloat16 inference")
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.config = model.config
        self.bf16 = bf16
        self.mask_threshold = float(model.mask_threshold)
        self._lock = threading.Lock()

    def _autocast(self):
        if self.bf16:
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def encode(self, volume: np.ndarray, frame: Frame) -> ImageFeatures:
        image = torch.from_numpy(frame_image(volume, frame))[None, None].to(self.device)
        with self._lock, torch.inference_mode(), self._autocast():
            return self.model.encode(image).map(torch.Tensor.float)

    def decode(self, features: ImageFeatures, coords_frame: np.ndarray, labels: np.ndarray,
               mask_logits: torch.Tensor | None, multimask: bool) -> tuple[torch.Tensor, float]:
        """Best mask's low-resolution logits (D, H, W) on the CPU and its predicted IoU."""
        coords = torch.as_tensor(np.asarray(coords_frame, np.float32)[None], device=self.device)
        lab = torch.as_tensor(np.asarray(labels, np.int64)[None], device=self.device)
        mask = None if mask_logits is None else mask_logits[None, None].to(self.device)
        with self._lock, torch.inference_mode(), self._autocast():
            logits, iou = self.model.decode(features, coords, lab, mask, multimask)
        best = int(iou[0].argmax())
        # A copy: a view would keep all four masks the decoder computes alive in the object's undo history.
        return logits[0, best].to("cpu", torch.float32, copy=True), float(iou[0, best])
