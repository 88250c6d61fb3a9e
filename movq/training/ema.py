"""An exponential moving average of a model's weights (Polyak averaging), evaluated and saved beside the
model; VQGAN and MaskGIT report EMA weights."""
from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """Exponential moving average of a model's trained parameters.

    Copied instead of averaged: buffers, parameters that gradients do not train (an EMA codebook,
    which follows its own moving average), and the parameters of a module whose ``initted`` buffer
    turned True since the last update (the quantizer's k-means init: averaging it with the random
    init it replaced would leave the EMA model's codes wrong for ~1 / (1 - decay) steps).
    The shadow is a full copy of the model, so evaluation simply runs ``ema.model``.
    """

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must lie in (0, 1), got {decay}")
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self._settled: set[str] = set()  # initted buffers True in both models: never looked at again (no sync)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        ema_state = self.model.state_dict()
        fresh = set()  # modules just initialised from data, by prefix ("" for the model itself)
        for name, buf in model.named_buffers():
            if name.split(".")[-1] == "initted" and name not in self._settled and bool(buf):
                if not bool(ema_state[name]):
                    fresh.add(name[: -len("initted")])
                self._settled.add(name)
        averaged = {name for name, p in model.named_parameters()  # once: a per-entry dict is O(n²) per step
                    if p.requires_grad and p.dtype.is_floating_point and not any(name.startswith(f) for f in fresh)}
        for name, value in model.state_dict().items():
            target = ema_state[name]
            if name in averaged:
                target.lerp_(value.to(target.dtype), 1.0 - self.decay)
            else:
                target.copy_(value)
