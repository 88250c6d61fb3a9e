"""Model folders: ``model.safetensors`` plus an architecture-only ``config.json``, as Hugging Face keeps
models (``save_pretrained`` / ``from_pretrained``), and the one resolver from what a user names (a model
folder, a checkpoint folder, a run folder) to the folder that holds the weights.

``config.json`` is ``{"format_version": 1, "class": "MoVQ" | "MaskGIT", "config": {...}}`` where
``config`` is the model's architecture dataclass (:class:`movq.config.MoVQConfig`,
:class:`movq.config.MaskGITConfig`) and nothing about training, so a renamed training setting never
breaks loading a model. Folders written before format 1 hold a ``config.yaml`` with the whole training
config instead; they still load (only their architecture sections are read).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Optional, TypeVar

import torch
import yaml
from torch import nn

from movq.config import ConfigError, load_config, to_dict
from movq.utils import PathLike, atomic_write, list_checkpoints, read_state_dict, save_state_dict

log = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
LEGACY_CONFIG_NAME = "config.yaml"  # before format 1: the resolved training config
FORMAT_VERSION = 1
CHECKPOINT_SUBFOLDERS = ("ema", "model")  # what a trainer's checkpoint folder holds, EMA first

M = TypeVar("M", bound="PretrainedModel")


def is_model_folder(path: Path) -> bool:
    return (path / WEIGHTS_NAME).is_file() and ((path / CONFIG_NAME).is_file() or (path / LEGACY_CONFIG_NAME).is_file())


def _legacy_kind(raw: dict) -> str:
    """Which model a pre-format-1 ``config.yaml`` describes, from its sections."""
    if "quantizer" in raw:
        return "MoVQ"
    if "sample" in raw or "width" in (raw.get("model") or {}):
        return "MaskGIT"
    return "unknown"


def read_model_config(folder: PathLike) -> tuple[str, dict]:
    """``(class name, architecture dict)`` of a model folder, from ``config.json`` or a legacy
    ``config.yaml``. Raises ``ValueError`` for an unreadable file or a newer format."""
    folder = Path(folder)
    path = folder / CONFIG_NAME
    if path.is_file():
        try:
            raw = json.loads(path.read_text())
        except ValueError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
        if not isinstance(raw, dict) or not {"format_version", "class", "config"} <= raw.keys():
            raise ValueError(f"{path} is not a movq model config (needs format_version, class and config)")
        if not isinstance(raw["format_version"], int) or raw["format_version"] > FORMAT_VERSION:
            raise ValueError(f"{path} has format_version {raw['format_version']!r}; this movq reads up to "
                             f"{FORMAT_VERSION}: upgrade movq to load it")
        return str(raw["class"]), raw["config"]
    path = folder / LEGACY_CONFIG_NAME
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ValueError(f"{path} is not a readable config: {e}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: the top level must be a mapping")
    kind = _legacy_kind(raw)
    if kind == "MoVQ":
        return kind, {k: raw[k] for k in ("model", "quantizer") if k in raw}
    return kind, raw.get("model") or {}


def resolve_model_dir(path: PathLike, kind: Optional[str] = None, prefer: str = "ema") -> Path:
    """The model folder a user means by ``path``: the folder itself, a checkpoint folder's ``ema/`` or
    ``model/`` (in the order ``prefer`` says), or a run folder's newest checkpoint. With ``kind``
    ("MoVQ", "MaskGIT") a folder of another model is an error that says what it holds."""
    if prefer not in CHECKPOINT_SUBFOLDERS:
        raise ValueError(f"prefer must be one of {list(CHECKPOINT_SUBFOLDERS)}, got {prefer!r}")
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"{p} does not exist")
    if (p / "checkpoints").is_dir() and not is_model_folder(p):
        found = list_checkpoints(p / "checkpoints")
        if not found:
            raise FileNotFoundError(f"run folder {p} has no finished checkpoint under checkpoints/")
        p = found[-1]
    order = (prefer, *(s for s in CHECKPOINT_SUBFOLDERS if s != prefer))
    folder = next((c for c in (p, *(p / s for s in order)) if is_model_folder(c)), None)
    if folder is None:
        raise FileNotFoundError(f"{p} is not a model folder: expected {WEIGHTS_NAME} and {CONFIG_NAME} in it or in "
                                f"its {' or '.join(s + '/' for s in order)}")
    if kind is not None:
        found_kind, _ = read_model_config(folder)
        if found_kind != kind:
            name = {"MoVQ": "a tokenizer (MoVQ)", "MaskGIT": "a MaskGIT prior",
                    "AutoregressivePrior": "an autoregressive prior"}
            raise ValueError(f"{folder} holds {name.get(found_kind, f'a {found_kind}')}, not {name.get(kind, kind)}")
    return folder


class PretrainedModel(nn.Module):
    """``save_pretrained`` / ``from_pretrained`` for a module built from one config dataclass.

    Subclasses set ``config_class`` and build themselves from ``cls(config)``; ``self.config`` is that
    dataclass."""

    config_class: type
    config: Any

    def save_pretrained(self, directory: PathLike) -> None:
        """Write ``model.safetensors`` and ``config.json`` into ``directory``, each atomically."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        meta = {"format": "pt", "movq_class": type(self).__name__}
        save_state_dict(self.state_dict(), directory / WEIGHTS_NAME, metadata=meta)
        record = {"format_version": FORMAT_VERSION, "class": type(self).__name__, "config": to_dict(self.config)}
        atomic_write(directory / CONFIG_NAME, json.dumps(record, indent=1) + "\n")

    @classmethod
    def from_pretrained(cls: type[M], path: PathLike, map_location: str = "cpu", prefer: str = "ema") -> M:
        """Rebuild from a model folder, checkpoint folder or run folder (see :func:`resolve_model_dir`), on
        ``map_location``, in eval mode; nothing is unpickled."""
        folder = resolve_model_dir(path, kind=cls.__name__, prefer=prefer)
        _, arch = read_model_config(folder)
        try:
            model = cls(load_config(cls.config_class, arch))
        except (ConfigError, ValueError) as e:
            raise ValueError(f"{folder}: the config does not describe a {cls.__name__}: {e}") from None
        state = read_state_dict(folder / WEIGHTS_NAME)  # on the CPU: load_state_dict copies into the model
        own = model.state_dict()
        bad_shapes = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own]
        if missing or unexpected or bad_shapes:
            raise ValueError(
                f"{folder / WEIGHTS_NAME} does not match the architecture in its config: missing keys "
                f"{missing[:8]}{'…' if len(missing) > 8 else ''}, unexpected keys {unexpected[:8]}"
                f"{'…' if len(unexpected) > 8 else ''}, wrong shapes {bad_shapes[:8]}"
            )
        non_finite = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
        if non_finite:
            raise ValueError(f"{folder / WEIGHTS_NAME} holds NaN or inf in {non_finite[:5]}: the weights are damaged "
                             "(a diverged run?); load an earlier checkpoint")
        model.load_state_dict(state)
        return model.to(map_location).eval()
