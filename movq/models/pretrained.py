"""Model folders: ``model.safetensors`` plus an architecture-only ``config.json``, as Hugging Face keeps
models (``save_pretrained`` / ``from_pretrained``), and the one resolver from what a user names (a model
folder, a checkpoint folder, a run folder) to the folder that holds the weights.

``config.json`` is ``{"format_version": 1, "class": "MoVQ" | "MaskGIT", "config": {...}}`` where
``config`` is the model's architecture dataclass (:class:`movq.config.MoVQConfig`,
:class:`movq.config.MaskGITConfig`) and nothing about training, so a renamed training setting never
breaks loading a model. Folders written before format 1 hold a ``config.yaml`` with the whole training
config instead; they still load (only their architecture sections are read).

The classes are Hugging Face ``ModelHubMixin`` models: ``from_pretrained`` also takes a Hub repo id
(``org/name``, with ``revision`` / ``local_files_only`` / ``cache_dir`` / ``token``), read through the Hub
cache (:mod:`movq.models.hub`); a local path always wins and resolves as before. ``save_pretrained``
writes a model card (``README.md``) beside the weights and, with ``push_to_hub=True``, uploads the folder.
"""
from __future__ import annotations

import importlib
import json
import logging
from pathlib import Path
from typing import Any, Optional, TypeVar

import torch
import yaml
from huggingface_hub import ModelCard, ModelHubMixin
from torch import nn

from movq.config import ConfigError, load_config, to_dict
from movq.models.hub import (
    CARD_NAME,
    CARD_TEMPLATE,
    card_kwargs,
    download_model_folder,
    looks_like_repo_id,
    upload_model_folder,
)
from movq.utils import PathLike, atomic_write, list_checkpoints, read_state_dict, save_state_dict

log = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
LEGACY_CONFIG_NAME = "config.yaml"  # before format 1: the resolved training config
FORMAT_VERSION = 1
CHECKPOINT_SUBFOLDERS = ("ema", "model")  # what a trainer's checkpoint folder holds, EMA first
MODEL_MODULES = {"MoVQ": "movq.models.autoencoder", "MaskGIT": "movq.models.maskgit",  # class name → module
                 "AutoregressivePrior": "movq.models.autoregressive"}

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


def hub_repo_id(name: PathLike) -> Optional[str]:
    """``name`` as a Hub repo id when it is one: ``org/name`` in form and not a local path (a ``Path`` never is)."""
    if isinstance(name, Path) or Path(name).expanduser().exists() or not looks_like_repo_id(str(name)):
        return None
    return str(name)


def resolve_pretrained(name: PathLike, kind: Optional[str] = None, prefer: str = "ema", *,
                       revision: Optional[str] = None, subfolder: Optional[str] = None,
                       local_files_only: bool = False, cache_dir: Optional[PathLike] = None,
                       token: Optional[str] = None, force_download: bool = False) -> Path:
    """The model folder ``name`` means: a local path as :func:`resolve_model_dir` resolves it, else a Hub
    repo id (``org/name``) fetched into, or with ``HF_HUB_OFFLINE=1`` only read from, the Hub cache."""
    repo_id = hub_repo_id(name)
    if repo_id is None:
        if revision is not None:
            raise ValueError(f"revision={revision!r} is for Hub repo ids; {name} is a local path")
        return resolve_model_dir(Path(name) / subfolder if subfolder else name, kind=kind, prefer=prefer)
    snapshot = download_model_folder(repo_id, revision=revision, subfolder=subfolder, cache_dir=cache_dir,
                                     local_files_only=local_files_only, token=token, force_download=force_download)
    return resolve_model_dir(snapshot, kind=kind, prefer=prefer)


def model_class(kind: str) -> type[PretrainedModel]:
    """The class a ``config.json`` names ("MoVQ", "MaskGIT", "AutoregressivePrior")."""
    if kind not in MODEL_MODULES:
        raise ValueError(f"unknown model class {kind!r}; movq has {sorted(MODEL_MODULES)}")
    return getattr(importlib.import_module(MODEL_MODULES[kind]), kind)


def write_model_card(folder: PathLike, **info: Any) -> Path:
    """(Re)write the model card of a saved model folder, with ``info`` (training, metrics, source, notes:
    see :func:`movq.models.hub.card_sections`) added to what its ``config.json`` says."""
    folder = Path(folder)
    kind, arch = read_model_config(folder)
    cls = model_class(kind)
    card = cls.model_card(load_config(cls.config_class, arch), **info)
    atomic_write(folder / CARD_NAME, str(card))
    return folder / CARD_NAME


class PretrainedModel(nn.Module, ModelHubMixin, library_name="movq", model_card_template=CARD_TEMPLATE,
                      tags=["movq"]):
    """``save_pretrained`` / ``from_pretrained`` for a module built from one config dataclass.

    Subclasses set ``config_class`` and build themselves from ``cls(config)``; ``self.config`` is that
    dataclass. They give their card a title, a one-paragraph summary and a usage snippet
    (``card_title``, :meth:`card_summary`)."""

    config_class: type
    config: Any
    card_title = "movq model"

    # ------------------------------------------------------------------ saving
    def _save_pretrained(self, save_directory: Path) -> None:
        """``ModelHubMixin``'s hook: ``model.safetensors`` and ``config.json``, each written atomically."""
        meta = {"format": "pt", "movq_class": type(self).__name__}
        save_state_dict(self.state_dict(), save_directory / WEIGHTS_NAME, metadata=meta)
        atomic_write(save_directory / CONFIG_NAME, json.dumps(self.config_record(), indent=1) + "\n")

    def config_record(self) -> dict:
        """What ``config.json`` holds."""
        return type(self).config_record_of(self.config)

    @classmethod
    def config_record_of(cls, config: Any) -> dict:
        return {"format_version": FORMAT_VERSION, "class": cls.__name__, "config": to_dict(config)}

    def save_pretrained(self, save_directory: PathLike, *, push_to_hub: bool = False, repo_id: Optional[str] = None,
                        model_card_kwargs: Optional[dict] = None, config: Any = None,
                        **push_to_hub_kwargs: Any) -> Optional[str]:
        """Write ``model.safetensors``, ``config.json`` and the model card ``README.md`` into
        ``save_directory`` (each atomically; the card is rewritten every time). With ``push_to_hub=True``
        the folder, with whatever else it holds, is uploaded to ``repo_id`` (default: the folder's name)
        and the commit URL returned. ``model_card_kwargs`` (``training``, ``metrics``, ``source``,
        ``notes``) add sections to the card."""
        if config is not None:
            raise ValueError("config= is not taken: movq writes config.json from the model's own config")
        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._save_pretrained(directory)
        card_info = dict(model_card_kwargs or {})
        if push_to_hub:
            repo_id = repo_id or directory.name
            card_info.setdefault("repo_id", repo_id)
        atomic_write(directory / CARD_NAME, str(self.generate_model_card(**card_info)))
        if push_to_hub:
            return upload_model_folder(directory, repo_id, **push_to_hub_kwargs)
        return None

    def push_to_hub(self, repo_id: str, *, model_card_kwargs: Optional[dict] = None, **kwargs: Any) -> str:
        """``ModelHubMixin.push_to_hub`` (save into a temporary folder, upload it) with the repo id in the card."""
        return super().push_to_hub(repo_id, model_card_kwargs={"repo_id": repo_id, **(model_card_kwargs or {})},
                                   **kwargs)

    # ------------------------------------------------------------------ the card
    @classmethod
    def card_summary(cls, config: Any) -> str:
        return f"A {cls.__name__}."

    @classmethod
    def model_card(cls, config: Any, *, repo_id: Optional[str] = None, **sections: Any) -> ModelCard:
        """The card of a model of this class with ``config`` (see :func:`write_model_card`)."""
        with torch.device("meta"):  # the parameter count without allocating the weights
            n_params = sum(p.numel() for p in cls(config).parameters())
        record = cls.config_record_of(config)
        name = repo_id or "path/to/this/folder"
        usage = f"from movq import {cls.__name__}\n\nmodel = {cls.__name__}.from_pretrained({name!r})"
        summary = f"{cls.card_summary(config)} {n_params / 1e6:.1f}M parameters."
        info = cls._hub_mixin_info
        return ModelCard.from_template(card_data=info.model_card_data, template_str=info.model_card_template,
                                       **card_kwargs(cls.card_title, summary, usage, record, **sections))

    def generate_model_card(self, *args: Any, **kwargs: Any) -> ModelCard:
        """``ModelHubMixin``'s card hook: :meth:`model_card` of this model's config."""
        return type(self).model_card(self.config, **kwargs)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls: type[M], pretrained_model_name_or_path: PathLike, map_location: str = "cpu",
                        prefer: str = "ema", *, revision: Optional[str] = None, subfolder: Optional[str] = None,
                        local_files_only: bool = False, cache_dir: Optional[PathLike] = None,
                        token: Optional[str] = None, force_download: bool = False) -> M:
        """Rebuild from a model folder, checkpoint folder or run folder (see :func:`resolve_model_dir`), or
        from a Hub repo id ``org/name`` (a name that is not a local path), on ``map_location``, in eval
        mode; nothing is unpickled. ``revision``, ``local_files_only``, ``cache_dir``, ``token`` and
        ``force_download`` are ``huggingface_hub``'s; ``HF_HUB_OFFLINE=1`` reads the Hub cache only."""
        name = pretrained_model_name_or_path
        hub = dict(revision=revision, cache_dir=cache_dir, force_download=force_download,
                   local_files_only=local_files_only, token=token)
        if hub_repo_id(name) is not None:
            return cls._from_pretrained(model_id=str(name), map_location=map_location, prefer=prefer,
                                        subfolder=subfolder, **hub)
        return cls._load_folder(resolve_pretrained(name, cls.__name__, prefer, subfolder=subfolder, **hub), map_location)

    @classmethod
    def _from_pretrained(cls: type[M], *, model_id: str, revision: Optional[str], cache_dir: Optional[PathLike],
                         force_download: bool, local_files_only: bool, token: Optional[str],
                         map_location: str = "cpu", prefer: str = "ema", subfolder: Optional[str] = None,
                         **model_kwargs: Any) -> M:
        """``ModelHubMixin``'s hook: a Hub repo's model folder, through the Hub cache."""
        folder = resolve_pretrained(model_id, kind=cls.__name__, prefer=prefer, revision=revision, subfolder=subfolder,
                                    local_files_only=local_files_only, cache_dir=cache_dir, token=token,
                                    force_download=force_download)
        return cls._load_folder(folder, map_location)

    @classmethod
    def _load_folder(cls: type[M], folder: Path, map_location: str) -> M:
        """Build from ``folder``'s config and load its weights, refusing mismatched or non-finite ones."""
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
