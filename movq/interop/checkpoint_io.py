"""Read checkpoint files without running pickled code.

A checkpoint is a state dict of tensors in ``.safetensors``, a plain ``.pt`` / ``.pth`` / ``.bin`` or a
PyTorch Lightning ``.ckpt`` (weights under ``state_dict``). Pickled files are opened with
``torch.load(weights_only=True)`` (PyTorch's restricted unpickler, "Serialization semantics" in the
PyTorch docs); the non-tensor objects it refuses (Lightning callbacks, numpy scalars) are replaced by
inert stand-ins that run nothing and are thrown away. A missing, truncated or corrupt file, or one that
holds no state dict, is a ``ConvertError`` naming the file.
"""
from __future__ import annotations

import logging
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any, Union

import torch

from movq.utils import read_state_dict

log = logging.getLogger(__name__)


class ConvertError(ValueError):
    """A source checkpoint that cannot be converted; the message names the file and the reason."""


class _Opaque:
    """Inert stand-in for a class or function a checkpoint names (Lightning callbacks, numpy scalars).

    Unpickling builds one of these instead of importing and calling the named object, so nothing from
    the file runs; the weights never reference them and they are thrown away.
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> _Opaque:
        return object.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass


_UNSAFE_GLOBAL = re.compile(r"GLOBAL (\S+) was not an allowed global")


def _torch_load(path: Path) -> tuple[Any, list[str]]:
    """``torch.load(weights_only=True)``, standing in ``_Opaque`` for every global it refuses."""
    stubbed: list[str] = []
    if zipfile.is_zipfile(path):
        try:
            stubbed = list(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
        except Exception:  # a damaged archive: let torch.load below say what is wrong
            stubbed = []
    for _ in range(64):
        try:
            with torch.serialization.safe_globals([(_Opaque, name) for name in stubbed]):
                return torch.load(path, map_location="cpu", weights_only=True), stubbed
        except pickle.UnpicklingError as e:
            m = _UNSAFE_GLOBAL.search(str(e))
            if m is None or m.group(1) in stubbed:
                lines = [line.strip() for line in str(e).splitlines() if line.strip()]
                reason = next((line for line in lines if "GLOBAL" in line or "Unsupported" in line), lines[0])
                raise ConvertError(
                    f"{path} holds pickled objects that torch.load(weights_only=True) refuses and movq will "
                    f"not unpickle by running their code ({reason}). Export the weights where the checkpoint was "
                    f"made, e.g. save_file(torch.load(path, weights_only=False)['state_dict'], 'weights.safetensors'), "
                    f"and convert that .safetensors file"
                ) from None
            stubbed.append(m.group(1))
        except Exception as e:  # zip / storage errors of a truncated or damaged file
            raise ConvertError(
                f"{path} is not a readable torch checkpoint (truncated or corrupt?): "
                f"{(str(e).splitlines() or [type(e).__name__])[0]}"
            ) from None
    raise ConvertError(f"{path}: too many non-tensor objects to stand in for")


def load_checkpoint(path: Union[str, os.PathLike]) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors``, a plain ``.pt/.pth/.bin`` state dict or a Lightning ``.ckpt``.

    Raises ``ConvertError`` for a missing, truncated or corrupt file, or one that holds no state dict.
    """
    path = Path(path)
    if not path.is_file():
        raise ConvertError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        try:
            return read_state_dict(path)
        except ValueError as e:
            raise ConvertError(f"{path} is not a readable safetensors file (truncated or corrupt?): {e}") from None
    obj, stubbed = _torch_load(path)
    if stubbed:
        log.info("%s: ignored non-tensor objects %s (stand-ins, nothing executed)", path, sorted(stubbed))
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]  # Lightning checkpoint
    if not isinstance(obj, dict) or not obj:
        raise ConvertError(f"{path} holds no state dict (got {type(obj).__name__})")
    not_tensors = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise ConvertError(
            f"{path} is not a state dict: entries {sorted(map(str, not_tensors))[:8]} are not tensors "
            f"(a Lightning checkpoint keeps its weights under 'state_dict')"
        )
    return obj

