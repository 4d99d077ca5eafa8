"""Mixed precision and memory layout on a training worker (shared by the loop and validation)."""

from __future__ import annotations

import torch


class Precision:
    """Autocast and the fp16 grad scaler, per `train.amp`; `channels_last` input layout."""

    def __init__(self, amp: str, channels_last: bool, device: torch.device):
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
        self.device_type = device.type
        self.channels_last = channels_last
        self.scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")

    def autocast(self):
        return torch.autocast(self.device_type, dtype=self.dtype, enabled=self.dtype is not None)

    def layout(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.to(memory_format=torch.channels_last) if self.channels_last else model

    def input(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x
