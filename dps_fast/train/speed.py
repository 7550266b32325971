"""GPU speed options of dps-train: --amp bf16|fp16, --channels-last, --compile.

Mixed precision runs the network under autocast; the DPS loss and its bank always
see float32 logits (the posterior update is a sum of many small terms). fp16 adds a
GradScaler, whose state is checkpointed so that --resume continues it.
"""
from __future__ import annotations

import contextlib

import torch

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class Speed:
    """What the run's speed flags change in a step: input layout, autocast, loss scaling."""

    def __init__(self, args, device: torch.device):
        self.device = device
        self.dtype = AMP_DTYPES.get(args.amp)
        self.channels_last = args.channels_last
        self.scaler = torch.amp.GradScaler(device.type) if args.amp == "fp16" else None

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.dim() == 4 else x

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def backward_step(self, loss: torch.Tensor, opt: torch.optim.Optimizer) -> None:
        if self.scaler is None:
            loss.backward()
            opt.step()
            return
        self.scaler.scale(loss).backward()
        self.scaler.step(opt)
        self.scaler.update()

    def state_dict(self) -> dict:
        return self.scaler.state_dict() if self.scaler is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)


def prepare_model(model: torch.nn.Module, args) -> torch.nn.Module:
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def compiled(net: torch.nn.Module, args) -> torch.nn.Module:
    """torch.compile of the training forward (the saved weights stay the uncompiled module's)."""
    return torch.compile(net) if args.compile else net
