"""From a trained prior to images: the prior (MaskGIT or autoregressive, by the class in its
``config.json``) with its sampling defaults and tokenizer, one call that samples either kind at the
training grid or larger (:func:`sample_prior`), the one rule that gives every sample its global index,
seed and label (shared by tools/sample.py and the trainers' FID), tokens decoded to images, and
pictures of partly masked token maps.

The index rule is DiT's ``sample_ddp.py``: N samples are drawn in iterations of a global batch
(batch × processes); rank r draws indices ``i·B·W + r·B + [0, B)`` in iteration i, and indices ≥ N are
not drawn. A batch's noise is seeded by (seed, its first index), so a sample is redrawn identically whenever the
seed and batch size are the same.

A prior's model folder may hold ``generation_config.json`` beside its ``config.json``: the sampling
defaults (``movq.config.SampleConfig``), the tokenizer that decodes its tokens (path and sha256) and the
class names of its training data.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
import yaml
from torch import Tensor, nn

from movq.config import PriorConfig, SampleConfig, load_config, to_dict
from movq.generation import autoregressive as ar_sampling
from movq.generation.canvas import generate_canvas
from movq.generation.maskgit import generate
from movq.models.autoencoder import MoVQ
from movq.models.autoregressive import AutoregressivePrior
from movq.models.maskgit import MaskGIT
from movq.models.pretrained import LEGACY_CONFIG_NAME, read_model_config, resolve_pretrained
from movq.utils import PathLike, atomic_write

Prior = Union[MaskGIT, AutoregressivePrior]
# The class name in a model folder's config.json → the prior's class and its PriorConfig.kind.
PRIOR_CLASSES = {"MaskGIT": MaskGIT, "AutoregressivePrior": AutoregressivePrior}
PRIOR_KIND_OF_CLASS = {"MaskGIT": "maskgit", "AutoregressivePrior": "autoregressive"}

GENERATION_CONFIG_NAME = "generation_config.json"
GRID_COLUMNS = 8


# --------------------------------------------------------------------------------------
# A prior and what it needs to sample
# --------------------------------------------------------------------------------------
@dataclass
class SamplingDefaults:
    """What a prior's folder says about sampling it: settings, tokenizer, classes (all optional)."""

    sample: SampleConfig = field(default_factory=SampleConfig)
    tokenizer: Optional[str] = None  # the MoVQ folder that made (and decodes) the training tokens
    tokenizer_sha256: Optional[str] = None  # of that tokenizer's weights, when the tokens were made
    classes: list[str] = field(default_factory=list)


def save_sampling_defaults(folder: PathLike, defaults: SamplingDefaults) -> None:
    atomic_write(Path(folder) / GENERATION_CONFIG_NAME, json.dumps(to_dict(defaults), indent=1) + "\n")


def load_sampling_defaults(folder: PathLike) -> SamplingDefaults:
    """From ``generation_config.json``, or from a legacy ``config.yaml`` (the whole prior run config)."""
    folder = Path(folder)
    path = folder / GENERATION_CONFIG_NAME
    if path.is_file():
        raw = json.loads(path.read_text())
        return SamplingDefaults(load_config(SampleConfig, raw.get("sample") or {}), raw.get("tokenizer"),
                                raw.get("tokenizer_sha256"), list(raw.get("classes") or []))
    if (folder / LEGACY_CONFIG_NAME).is_file():
        cfg = load_config(PriorConfig, yaml.safe_load((folder / LEGACY_CONFIG_NAME).read_text()) or {})
        return SamplingDefaults(cfg.sample, cfg.data.tokenizer)
    return SamplingDefaults()


def prior_kind(model: nn.Module) -> str:
    """``"maskgit"`` or ``"autoregressive"`` (``PriorConfig.kind``) of a prior."""
    try:
        return PRIOR_KIND_OF_CLASS[type(model).__name__]
    except KeyError:
        raise ValueError(f"{type(model).__name__} is not a prior (MaskGIT or AutoregressivePrior)") from None


def resolve_prior_dir(path: PathLike, prefer: str = "ema") -> Path:
    """The model folder of a prior (either kind) that ``path`` names: a model, checkpoint or run folder.
    A folder of another model (a tokenizer) is a ``ValueError`` that says what it holds. A Hub repo id is
    read through the Hub cache."""
    folder = resolve_pretrained(path, prefer=prefer)
    found, _ = read_model_config(folder)
    if found not in PRIOR_CLASSES:
        what = "a tokenizer (MoVQ)" if found == "MoVQ" else f"a {found}"
        raise ValueError(f"{folder} holds {what}, not a prior (MaskGIT or AutoregressivePrior)")
    return folder


def load_prior(path: PathLike, map_location: str = "cpu", prefer: str = "ema") -> tuple[Prior, SamplingDefaults]:
    """``(prior in eval mode, its sampling defaults)`` from a model, checkpoint or run folder: a
    :class:`MaskGIT` or an :class:`AutoregressivePrior`, by the class its ``config.json`` names (folders
    from before format 1 hold MaskGIT priors)."""
    folder = resolve_prior_dir(path, prefer)
    kind, _ = read_model_config(folder)
    return PRIOR_CLASSES[kind].from_pretrained(folder, map_location), load_sampling_defaults(folder)


@torch.no_grad()
def sample_prior(
    model: Prior,
    labels: Optional[Tensor],
    settings: SampleConfig,
    *,
    num_samples: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    grid: Optional[tuple[int, int]] = None,
    overlap: Optional[int] = None,
    return_history: bool = False,
    condition: Optional[Tensor] = None,
):
    """Sample tokens ``int64 [B, C, H, W]`` from either prior with ``settings`` (a :class:`SampleConfig`).
    ``condition``: ``uint8 [B or 1, ch, H', W']`` image conditions of a conditional prior (None: its null
    condition); at the training grid only.

    ``grid`` (default: the training grid) may be larger than the training grid: MaskGIT then decodes
    training-size windows with ``overlap`` cells in common (:func:`movq.generation.canvas.generate_canvas`),
    the autoregressive prior slides taming's window (:func:`movq.generation.autoregressive.sample_large`).
    With ``return_history`` the history of the training-grid samplers comes back too
    (:class:`movq.generation.maskgit.DecodeHistory` / :class:`movq.generation.autoregressive.SampleHistory`).
    """
    kind, s = prior_kind(model), settings
    train_grid = model.config.grid_hw
    grid = train_grid if grid is None else (int(grid[0]), int(grid[1]))
    large = grid != train_grid
    if large and return_history:
        raise ValueError("return_history is only available at the training grid")
    if large and getattr(model, "condition", None) is not None:
        raise ValueError("a prior with an image condition samples at its training grid (the condition covers it)")
    if kind == "maskgit":
        kw = dict(num_samples=num_samples, generator=generator, steps=s.steps, temperature=s.temperature,
                  choice_temperature=s.choice_temperature, cfg_scale=s.cfg_scale, cfg_schedule=s.cfg_schedule,
                  schedule=model.config.mask_schedule)
        if large:
            return generate_canvas(model, grid, labels, overlap=overlap, **kw)
        return generate(model, labels, return_history=return_history, condition=condition, **kw)
    if s.cfg_schedule != "constant":
        raise ValueError(f"cfg_schedule {s.cfg_schedule!r} is a MaskGIT setting: the autoregressive prior guides "
                         "every token with the same scale (set sample.cfg_schedule=constant)")
    kw = dict(num_samples=num_samples, generator=generator, temperature=s.temperature, top_k=s.top_k,
              top_p=s.top_p, cfg_scale=s.cfg_scale)
    if large:
        return ar_sampling.sample_large(model, grid, labels, **kw)
    return ar_sampling.sample(model, labels, return_history=return_history, condition=condition, **kw)


def load_tokenizer_for(prior: Prior, path: PathLike, device) -> MoVQ:
    """The tokenizer that decodes ``prior``'s tokens (a model, checkpoint or run folder), checked to have the
    prior's codebook size and channels."""
    tok = MoVQ.from_pretrained(path).to(device)
    q, m = tok.config.quantizer, prior.config
    if (q.codebook_size, q.channels) != (m.codebook_size, m.channels):
        raise ValueError(f"tokenizer {path} has K={q.codebook_size}, C={q.channels} but the prior was trained on "
                         f"K={m.codebook_size}, C={m.channels} tokens")
    return tok


# --------------------------------------------------------------------------------------
# Which sample is which
# --------------------------------------------------------------------------------------
def plan_batches(n: int, rank: int, world: int, batch: int) -> list[np.ndarray]:
    """The global indices of ``rank``'s batches, in order: iteration i draws ``i·B·W + r·B + [0, B)``.
    Every batch is whole (its noise does not depend on ``n``) and starts below ``n``; its indices ≥ ``n``
    are drawn and dropped. Over all ranks every index in ``[0, n)`` is drawn once."""
    return [np.arange(start, start + batch) for start in range(rank * batch, n, batch * world)]


def batch_seed(seed: int, first_index: int) -> int:
    """The generator seed of the batch that starts at global index ``first_index``."""
    return int(np.random.SeedSequence([seed % 2**32, first_index]).generate_state(1, np.uint64)[0] >> 1)


def sample_labels(rule: str, num_classes: int, index: np.ndarray, device) -> Optional[Tensor]:
    """Class labels of the samples with global indices ``index``: ``"cycle"`` (index mod num_classes),
    ``"class K"`` (all K) or ``"null"`` (None: the unconditional null class)."""
    if rule == "null":
        return None
    if rule == "cycle":
        return torch.from_numpy(index % num_classes).to(device)
    if rule.startswith("class "):
        return torch.full((len(index),), int(rule.split()[1]), dtype=torch.long, device=device)
    raise ValueError(f"label rule must be 'null', 'cycle' or 'class K', got {rule!r}")


# --------------------------------------------------------------------------------------
# Tokens to pictures
# --------------------------------------------------------------------------------------
@torch.no_grad()
def tokens_to_images(tokenizer: nn.Module, tokens: Tensor, batch: int = 64) -> Tensor:
    """``int [B, C, h, w]`` → float images ``[B, 3, H, W]`` in [-1, 1] (fp32, on the tokens' device)."""
    return torch.cat([tokenizer.decode_indices(t).float().clamp(-1, 1) for t in tokens.split(batch)])


def token_map_images(tokens: Tensor, codebook_size: int, cell: int = 4) -> Tensor:
    """A picture of token ids when no tokenizer is at hand: each id a fixed colour, the C channels
    side by side; ``[B, 3, h·cell, C·w·cell]`` in [-1, 1]."""
    palette = torch.from_numpy(np.random.default_rng(0).uniform(-1, 1, (codebook_size + 1, 3)).astype(np.float32))
    b, c, h, w = tokens.shape
    img = palette[tokens.long().cpu().clamp(0, codebook_size)]  # [B, C, h, w, 3]
    img = img.permute(0, 4, 2, 1, 3).reshape(b, 3, h, c * w)  # channels side by side
    return img.repeat_interleave(cell, 2).repeat_interleave(cell, 3)


def shade_cells(images: Tensor, keep: Tensor) -> Tensor:
    """Grey out masked cells, for pictures: ``keep [B or 1, h, w]`` is a bool (False = masked) or the
    fraction of a cell's channels that are known (a partly known cell is partly grey)."""
    H, W = images.shape[-2:]
    m = torch.nn.functional.interpolate(keep.float()[:, None], size=(H, W), mode="nearest").to(images.device)
    return images * m  # 0 is mid-grey in [-1, 1]


def grid_columns(num_classes: int) -> int:
    """One column per class when they fit on a row (a class-conditional grid reads by column)."""
    return num_classes if 0 < num_classes <= 2 * GRID_COLUMNS else GRID_COLUMNS


def rows_of(images: Tensor, columns: int = GRID_COLUMNS) -> list[Tensor]:
    return list(images.split(columns))


def with_sample_overrides(sample: SampleConfig, **overrides) -> SampleConfig:
    """``sample`` with the given fields replaced where the value is not None (command-line flags)."""
    return dataclasses.replace(sample, **{k: v for k, v in overrides.items() if v is not None})
