"""A CLIP model (Radford et al., "Learning Transferable Visual Models From Natural Language Supervision", 2021)
read from a local folder, frozen, for text guidance: text → unit embedding, images → unit embedding.

The folder is a Hugging Face ``transformers`` CLIP repository downloaded by hand (nothing is fetched at run time):

    config.json                    the CLIPConfig (model_type "clip")
    model.safetensors              the weights; or model.safetensors.index.json and the shards it lists
    tokenizer.json                 the tokenizer; or vocab.json + merges.txt (CLIP's byte-level BPE)
    preprocessor_config.json       optional: image_mean / image_std (else OpenAI CLIP's)

e.g. ``openai/clip-vit-base-patch32`` (ViT-B/32, 224²), ``openai/clip-vit-large-patch14``, or a LAION model such as
``laion/CLIP-ViT-B-32-laion2B-s34B-b79K``, whose repository holds the transformers files beside the open_clip ones.

Why transformers' ``CLIPModel`` rather than open_clip or a CLIP of our own: open_clip imports torchvision, which
does not import beside this project's torch builds; the transformers classes are the reference implementation of
the weights of both the OpenAI and the LAION repositories (same keys, same tokenizer), install without pulling a
torch of their own, and leave nothing here to keep numerically in step with them. Only safetensors are read
(never ``pytorch_model.bin``: loading it would unpickle). open_clip's own layout (``open_clip_model.safetensors``)
is not read: the same repositories hold the transformers files.

Only the sub-modules whose call signatures transformers has kept from 4.40 to 5.x are used
(``vision_model(...).pooler_output`` → ``visual_projection``, ``text_model(...).pooler_output`` →
``text_projection``), not ``get_image_features`` (whose return type changed in 5.0).
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# OpenAI CLIP's input normalization (every released CLIP uses it unless its preprocessor_config.json says otherwise)
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
EXAMPLE_REPO = "openai/clip-vit-base-patch32"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json",)  # or both of BPE_FILES
BPE_FILES = ("vocab.json", "merges.txt")
PREPROCESSOR_NAME = "preprocessor_config.json"
INSTALL_HINT = "pip install 'movq[clip]' (or pip install 'transformers>=4.40')"


class ClipFilesError(FileNotFoundError):
    """A CLIP folder that cannot be used; the message (one line) names the file and how to get it."""


def _how_to_get(names: str) -> str:
    return (f"download {names} by hand from a transformers CLIP repository on the Hugging Face hub "
            f"(e.g. {EXAMPLE_REPO}) into that folder")


def clip_files(folder: Union[str, os.PathLike]) -> dict[str, Path]:
    """The files of a CLIP folder (keys ``config``, ``weights``, ``tokenizer``), or a ``ClipFilesError`` naming
    the first that is missing and how to get it. Reads only ``config.json`` (and the weights index)."""
    folder = Path(folder)
    needed = f"{CONFIG_NAME}, {WEIGHTS_NAME}, {BPE_FILES[0]} and {BPE_FILES[1]} (or {TOKENIZER_FILES[0]})"
    if not folder.is_dir():
        raise ClipFilesError(f"CLIP folder {folder} does not exist; {_how_to_get(needed)}")
    config = folder / CONFIG_NAME
    if not config.is_file():
        if (folder / "open_clip_config.json").is_file():
            raise ClipFilesError(f"{folder} holds an open_clip checkpoint, which is not read; {_how_to_get(needed)} "
                                 "(LAION's repositories hold these transformers files beside the open_clip ones)")
        raise ClipFilesError(f"{config} is missing; {_how_to_get(CONFIG_NAME)}")
    try:
        model_type = json.loads(config.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError) as e:
        raise ClipFilesError(f"{config} is not a readable JSON config ({type(e).__name__}: {e})") from None
    if model_type != "clip":
        raise ClipFilesError(f"{config} describes a {model_type!r} model, not a transformers CLIPModel "
                             f"(model_type 'clip'); {_how_to_get(needed)}")
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        weights = folder / WEIGHTS_INDEX_NAME
        if weights.is_file():
            _check_shards(weights)
        elif (folder / "pytorch_model.bin").is_file():
            raise ClipFilesError(f"{folder / WEIGHTS_NAME} is missing: only safetensors weights are read, never "
                                 f"pytorch_model.bin (a pickle); {_how_to_get(WEIGHTS_NAME)}, or, if you trust the "
                                 "pickle, convert it once: CLIPModel.from_pretrained(folder).save_pretrained(folder)")
        else:
            raise ClipFilesError(f"{folder / WEIGHTS_NAME} is missing; {_how_to_get(WEIGHTS_NAME)}")
    if (folder / TOKENIZER_FILES[0]).is_file():
        tokenizer = folder / TOKENIZER_FILES[0]
    elif all((folder / n).is_file() for n in BPE_FILES):
        tokenizer = folder / BPE_FILES[0]
    else:
        missing = [n for n in BPE_FILES if not (folder / n).is_file()]
        raise ClipFilesError(f"CLIP tokenizer file {folder / missing[0]} is missing (and there is no "
                             f"{TOKENIZER_FILES[0]}); {_how_to_get(' and '.join(BPE_FILES))}")
    return {"config": config, "weights": weights, "tokenizer": tokenizer}


def _check_shards(index: Path) -> None:
    try:
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (OSError, ValueError, KeyError, AttributeError) as e:
        raise ClipFilesError(f"{index} is not a readable weights index ({type(e).__name__}: {e})") from None
    for name in shards:
        if not (index.parent / name).is_file():
            raise ClipFilesError(f"weights shard {index.parent / name} (listed in {index.name}) is missing; "
                                 f"{_how_to_get(name)}")


def _normalization(folder: Path) -> tuple[Sequence[float], Sequence[float]]:
    path = folder / PREPROCESSOR_NAME
    if not path.is_file():
        return OPENAI_MEAN, OPENAI_STD
    raw = json.loads(path.read_text())
    return raw.get("image_mean", OPENAI_MEAN), raw.get("image_std", OPENAI_STD)


class Clip(nn.Module):
    """A frozen transformers ``CLIPModel`` and its tokenizer: ``encode_text`` / ``encode_image`` give unit vectors
    ``[N, embed_dim]``; images are RGB in [0, 1] at ``image_size``² (the input normalization is applied here)."""

    def __init__(self, model: nn.Module, tokenizer, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.image_size = int(model.config.vision_config.image_size)
        self.context_length = int(model.config.text_config.max_position_embeddings)  # 77 for every released CLIP
        self.embed_dim = int(model.config.projection_dim)

    def tokenize(self, text: str) -> Tensor:
        """A prompt → token ids ``int64 [1, L]`` (start and end tokens included), or a ValueError when it is
        empty or longer than the context (CLIP would drop the rest, which changes what it means)."""
        if not text.strip():
            raise ValueError("the prompt is empty")
        ids = self.tokenizer(text, add_special_tokens=True)["input_ids"]
        if len(ids) > self.context_length:
            raise ValueError(f"the prompt {text[:40]!r}... is {len(ids)} tokens long; this CLIP reads at most "
                             f"{self.context_length} (start and end tokens included): shorten it")
        return torch.tensor([ids], dtype=torch.long, device=self.mean.device)

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str]) -> Tensor:
        """``P`` prompts → unit embeddings ``[P, embed_dim]`` (fp32). One prompt at a time: no padding, so each
        is read exactly as CLIP was trained (its causal text model pools at the end token)."""
        out = []
        for text in texts:
            pooled = self.model.text_model(input_ids=self.tokenize(text)).pooler_output
            out.append(self.model.text_projection(pooled))
        return F.normalize(torch.cat(out).float(), dim=-1)

    def encode_image(self, images: Tensor) -> Tensor:
        """``[N, 3, S, S]`` RGB in [0, 1], S = ``image_size`` → unit embeddings ``[N, embed_dim]`` (fp32);
        differentiable with respect to ``images``."""
        if images.dim() != 4 or images.shape[1:] != (3, self.image_size, self.image_size):
            raise ValueError(f"CLIP expects images [N, 3, {self.image_size}, {self.image_size}], got {tuple(images.shape)}")
        x = (images.float() - self.mean) / self.std
        pooled = self.model.vision_model(pixel_values=x.to(self.model.dtype)).pooler_output
        return F.normalize(self.model.visual_projection(pooled).float(), dim=-1)


def load_clip(folder: Union[str, os.PathLike], device: Union[str, torch.device] = "cpu",
              dtype: torch.dtype = torch.float32) -> Clip:
    """A CLIP from a local transformers CLIP folder (see the module docstring), frozen, in eval mode on ``device``.
    Raises ``ClipFilesError`` for a missing file and ``ImportError`` (with the install command) without
    transformers. Nothing is downloaded: ``local_files_only``."""
    files = clip_files(folder)
    folder = Path(folder)
    try:
        from transformers import CLIPModel, CLIPTokenizerFast
    except ImportError as e:
        raise ImportError(f"text guidance with CLIP needs the transformers package ({e}): {INSTALL_HINT}") from None
    model = CLIPModel.from_pretrained(folder, local_files_only=True, use_safetensors=True).to(dtype)
    tokenizer = CLIPTokenizerFast.from_pretrained(folder, local_files_only=True)
    if len(tokenizer) > model.config.text_config.vocab_size:
        raise ValueError(f"{files['tokenizer']} has {len(tokenizer)} tokens but the model's vocabulary "
                             f"{model.config.text_config.vocab_size}: the tokenizer is not this model's")
    mean, std = _normalization(folder)
    return Clip(model, tokenizer, mean, std).to(device)
