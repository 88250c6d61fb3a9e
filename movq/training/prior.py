"""The MaskGIT prior's config, checkpoints and training loop (Chang et al. 2022 on Accelerate).

The loop is :class:`movq.train_loop.TrainLoop` (DiT's train.py), shared with the tokenizer's trainer;
this file fills in its hooks. The same guarantees hold: every rank reads its own share of the token
shards; only rank 0 writes; checkpoints are atomic and a resume is bit-exact on CPU (the token
stream is a pure function of seed and position, RNG states are restored); a non-finite loss or
gradient skips the step; SIGINT / SIGTERM save and exit.

One optimizer step is ``train.grad_accum`` micro-batches of the masked-token loss
(:meth:`movq.maskgit.MaskGIT.training_loss`), AdamW over :meth:`MaskGIT.param_groups` (decay on
matrices only), linear warmup. Every ``train.eval_every`` steps rank 0 writes a grid of samples
(decoded with the tokenizer, else token maps) and an inpainting example from the EMA model;
every ``train.fid_every`` steps all ranks compute FID when the Inception weights are present.

A prior checkpoint folder (``model/`` or ``ema/``) holds ``model.safetensors`` and the resolved
``config.yaml`` of the whole :class:`PriorConfig`; :func:`load_prior` rebuilds it.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import Tensor, nn

from movq.config import (
    MaskGITConfig,
    PriorConfig,
    load_config,
    save_config,
)
from movq.data.tokens import TokenDataset, read_token_manifest, resolve_tokenizer
from movq.evaluation.visualize import save_grid
from movq.generation.maskgit import box_mask, generate
from movq.models.maskgit import MaskGIT
from movq.training.checkpoints import (
    eval_mode,
    list_checkpoints,
    load_state_dict,
    save_state_dict,
    warmup_lambda,
)
from movq.training.loop import TrainLoop

log = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.yaml"
GRID_COLUMNS = 8
# The inpainting example regenerates the centre of the token grid: half its height and width.
INPAINT_BOX = (0.25, 0.25, 0.75, 0.75)



def resolve_model_shape(cfg: PriorConfig, manifest: dict, where: str) -> PriorConfig:
    """Check (or, with ``data.model_shape=from_tokens``, set) the model's shape from the tokens."""
    m = cfg.model
    tokens = {"codebook_size": int(manifest["codebook_size"]), "channels": int(manifest["channels"]),
              "grid": (int(manifest["height"]), int(manifest["width"]))}
    n_classes = len(manifest["classes"])
    if cfg.data.model_shape == "from_tokens":
        classes = n_classes if m.num_classes > 0 else 0
        grid = tokens["grid"][0] if tokens["grid"][0] == tokens["grid"][1] else tokens["grid"]
        cfg.model = dataclasses.replace(m, codebook_size=tokens["codebook_size"], channels=tokens["channels"],
                                        grid=grid, num_classes=classes)
        return cfg
    if cfg.data.model_shape != "check":
        raise ValueError(f"data.model_shape must be 'check' or 'from_tokens', got {cfg.data.model_shape!r}")
    mine = {"codebook_size": m.codebook_size, "channels": m.channels, "grid": m.grid_hw}
    bad = [k for k in mine if mine[k] != tokens[k]]
    if bad:
        fix = " ".join(f"model.{k}={list(tokens[k]) if k == 'grid' else tokens[k]}" for k in bad)
        raise ValueError(f"the model does not fit the tokens in {where}: set {fix} (or data.model_shape=from_tokens)")
    if m.num_classes > 0 and n_classes == 0:
        raise ValueError(f"the tokens in {where} have no class labels: set model.num_classes=0 for an unconditional prior")
    if m.num_classes > 0 and n_classes > m.num_classes:
        raise ValueError(f"the tokens in {where} have {n_classes} classes but model.num_classes={m.num_classes}")
    return cfg


# --------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------
def save_prior(model: MaskGIT, cfg: PriorConfig, directory: Union[str, os.PathLike]) -> None:
    """``model.safetensors`` + the resolved ``config.yaml``, each written atomically."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_state_dict(model, directory / WEIGHTS_NAME)
    save_config(cfg, directory / CONFIG_NAME)


def resolve_prior(path: Union[str, os.PathLike], prefer: str = "ema") -> Path:
    """A :func:`save_prior` folder from itself, a checkpoint folder (``ema/`` or ``model/``, in the
    order ``prefer`` says) or a run folder (its newest checkpoint)."""
    if prefer not in ("ema", "model"):
        raise ValueError(f"prefer must be 'ema' or 'model', got {prefer!r}")
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"checkpoint {p} does not exist")
    if (p / "checkpoints").is_dir():
        found = list_checkpoints(p / "checkpoints")
        if not found:
            raise FileNotFoundError(f"run folder {p} has no finished checkpoint under checkpoints/")
        p = found[-1]
    order = ("", "ema", "model") if prefer == "ema" else ("", "model", "ema")
    for sub in order:
        cand = p / sub if sub else p
        if (cand / WEIGHTS_NAME).is_file() and (cand / CONFIG_NAME).is_file():
            return cand
    raise FileNotFoundError(
        f"{p} is not a prior checkpoint: expected {WEIGHTS_NAME} + {CONFIG_NAME} in it or in its ema/ or model/"
    )


def load_prior(path: Union[str, os.PathLike], map_location: str = "cpu", prefer: str = "ema") -> tuple[MaskGIT, PriorConfig]:
    """Rebuild ``(MaskGIT in eval mode, PriorConfig)`` from a checkpoint; nothing is unpickled."""
    folder = resolve_prior(path, prefer)
    raw = yaml.safe_load((folder / CONFIG_NAME).read_text()) or {}
    if isinstance(raw, dict) and "quantizer" in raw and "sample" not in raw:  # a TokenizerConfig
        raise ValueError(f"{folder} holds a tokenizer (MoVQ), not a MaskGIT prior: pass it as --tokenizer, and a "
                         "prior run (tools/train_prior.py) as --checkpoint")
    cfg = load_config(PriorConfig, folder / CONFIG_NAME)
    model = MaskGIT(cfg.model)
    load_state_dict(model, folder / WEIGHTS_NAME)
    return model.to(map_location).eval(), cfg


def load_decoder(path: Optional[str], model_cfg: MaskGITConfig, device) -> Optional[nn.Module]:
    """The tokenizer that decodes the prior's tokens, checked against its shape; None without a path."""
    if not path:
        return None
    from movq.models.autoencoder import MoVQ

    folder = resolve_tokenizer(path)
    tok = MoVQ.from_pretrained(folder).eval().to(device)
    q = tok.config.quantizer
    if (q.codebook_size, q.channels) != (model_cfg.codebook_size, model_cfg.channels):
        raise ValueError(
            f"tokenizer {folder} has K={q.codebook_size}, C={q.channels} but the prior was trained on "
            f"K={model_cfg.codebook_size}, C={model_cfg.channels} tokens"
        )
    return tok


# --------------------------------------------------------------------------------------
# Pictures of samples (shared with tools/sample.py)
# --------------------------------------------------------------------------------------
def fid_sample_batches(per_rank: int, rank: int, batch: int) -> list[tuple[int, int]]:
    """(first global sample index, size) of ``rank``'s FID batches: rank r makes the global indices
    ``[r * per_rank, (r + 1) * per_rank)``, so all ranks together make ``world * per_rank`` distinct ones."""
    return [(rank * per_rank + i, min(batch, per_rank - i)) for i in range(0, per_rank, batch)]


def class_cycle(n: int, num_classes: int, device=None) -> Optional[Tensor]:
    """Labels ``0, 1, ..., K-1, 0, ...`` for a grid of a class-conditional model; None if unconditional."""
    return torch.arange(n, device=device) % num_classes if num_classes > 0 else None


@torch.no_grad()
def decode_tokens(tokenizer: nn.Module, tokens: Tensor, batch: int = 64) -> Tensor:
    """``int [B, C, h, w]`` → float images ``[B, 3, H, W]`` in [-1, 1] (fp32, on the tokens' device)."""
    out = [tokenizer.decode_indices(t).float().clamp(-1, 1) for t in tokens.split(batch)]
    return torch.cat(out)


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


# --------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------
class _TrainingLoss(nn.Module):
    """Puts ``training_loss`` behind ``forward``, so DDP's gradient hooks see the call."""

    def __init__(self, prior: MaskGIT):
        super().__init__()
        self.prior = prior

    def forward(self, tokens: Tensor, labels: Optional[Tensor]):
        return self.prior.training_loss(tokens, labels)


class PriorTrainer(TrainLoop):
    """Builds everything from a ``PriorConfig``; ``fit()`` (:class:`movq.train_loop.TrainLoop`) trains
    to ``train.max_steps``."""

    unit = "samples"

    def __init__(self, cfg: PriorConfig, accelerator: Optional[Accelerator] = None):
        t = cfg.train
        if t.grad_accum < 1 or t.max_steps < 0 or cfg.data.batch_size < 1:
            raise ValueError("train.grad_accum and data.batch_size must be ≥ 1 and train.max_steps ≥ 0")
        if not cfg.data.tokens:
            raise ValueError("data.tokens must name a token folder (made by tools/tokenize_dataset.py)")
        manifest = read_token_manifest(cfg.data.tokens)
        cfg = resolve_model_shape(cfg, manifest, cfg.data.tokens)
        made_by = manifest.get("tokenizer")
        if cfg.data.tokenizer is None and made_by and Path(made_by).is_dir():
            cfg.data.tokenizer = made_by  # stored in the run's config for tools/sample.py
        self._setup(cfg, accelerator)
        acc = self.acc
        self.data = TokenDataset(cfg.data.tokens, rank=acc.process_index, world_size=acc.num_processes,
                                 verify=cfg.data.verify)

        set_seed(t.seed)  # identical initial weights on every rank
        prior = MaskGIT(cfg.model)
        self.ema = self._make_ema(prior)
        opt = torch.optim.AdamW(prior.param_groups(t.weight_decay), lr=t.lr, betas=t.betas)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_lambda(t.warmup_steps))
        self.model, self.opt, self.sched = acc.prepare(_TrainingLoss(prior), opt, sched)
        self._setup_loop()
        self.tokenizer = load_decoder(cfg.data.tokenizer, cfg.model, acc.device) if cfg.data.tokenizer else None
        self._setup_outputs()

    @property
    def prior(self) -> MaskGIT:
        return self.acc.unwrap_model(self.model).prior

    # ------------------------------------------------------------------ checkpoints
    def _write_weights(self, folder: Path) -> None:
        save_prior(self.prior, self.cfg, folder / "model")
        if self.ema is not None:
            save_prior(self.ema.model, self.cfg, folder / "ema")

    # ------------------------------------------------------------------ one optimizer step
    def _batches(self, start_step: int) -> Iterator[dict]:
        return self.data.batches(self.cfg.data.batch_size, self.cfg.data.seed, start_step=start_step)

    def _batch_size(self, batch: dict) -> int:
        return batch["tokens"].shape[0]

    def _labels(self, batch: dict) -> Optional[Tensor]:
        return batch["label"].to(self.acc.device) if self.cfg.model.num_classes > 0 else None

    def _train_batch(self, batch: dict) -> dict:
        acc = self.acc
        tokens = batch["tokens"].to(acc.device, non_blocking=True)
        with acc.accumulate(self.model):
            with acc.autocast():
                loss, logs = self.model(tokens, self._labels(batch))
            acc.backward(loss)
        return logs

    def _optimizer_step(self, logs: dict) -> bool:
        acc, t = self.acc, self.cfg.train
        norm = acc.clip_grad_norm_(self.model.parameters(), t.grad_clip if t.grad_clip > 0 else math.inf)
        ok = self._step_ok(logs["loss"], norm)
        if ok:
            self.opt.step()
            self.sched.step()
            if self.ema is not None:
                self.ema.update(self.prior)
        self.opt.zero_grad(set_to_none=True)
        logs["grad_norm"] = norm
        return ok

    # ------------------------------------------------------------------ evaluation
    def _eval_model(self) -> MaskGIT:
        return self.ema.model if self.ema is not None else self.prior

    def _sample(self, model: MaskGIT, labels: Optional[Tensor], n: int, seed: int, **kw) -> Tensor:
        s = self.cfg.sample
        g = torch.Generator(self.acc.device).manual_seed(seed)
        with self.acc.autocast():  # the training precision (bf16 on GPU runs)
            return generate(model, labels, num_samples=n, generator=g, steps=s.steps, temperature=s.temperature,
                            choice_temperature=s.choice_temperature, cfg_scale=s.cfg_scale if labels is not None else 1.0,
                            cfg_schedule=s.cfg_schedule, schedule=model.config.mask_schedule, **kw)

    def _pictures(self, tokens: Tensor) -> Tensor:
        if self.tokenizer is not None:
            return decode_tokens(self.tokenizer, tokens).cpu()
        return token_map_images(tokens, self.cfg.model.codebook_size)

    @torch.no_grad()
    def write_pictures(self) -> dict[str, Path]:
        """Rank 0: a grid of samples (one class per column cycle) and an inpainting example."""
        model, s, dev = self._eval_model(), self.cfg.sample, self.acc.device
        out = {}
        with eval_mode(model):
            if s.grid_images > 0:
                labels = class_cycle(s.grid_images, self.cfg.model.num_classes, dev)
                tokens = self._sample(model, labels, s.grid_images, self.cfg.train.seed)
                out["samples"] = self.run.images / f"samples_{self.step:07d}.png"
                save_grid(rows_of(self._pictures(tokens), grid_columns(self.cfg.model.num_classes)), out["samples"])
            n = min(s.inpaint_images, len(self.data))
            if n > 0:
                first = self.data.take(slice(0, n))
                real, labels = first["tokens"].to(dev), self._labels(first)
                h, w = self.cfg.model.grid_hw
                box = (INPAINT_BOX[0] * w, INPAINT_BOX[1] * h, INPAINT_BOX[2] * w, INPAINT_BOX[3] * h)
                known = box_mask(h, w, box, image_size=(h, w), inside=True).to(dev)
                filled = self._sample(model, labels, n, self.cfg.train.seed + 1, tokens=real, known_mask=known)
                pics = self._pictures(torch.cat([real, filled]))
                orig, new = pics[:n], pics[n:]
                out["inpaint"] = self.run.images / f"inpaint_{self.step:07d}.png"
                save_grid([orig, shade_cells(orig, known[None].cpu()), new], out["inpaint"])
        return out

    @torch.no_grad()
    def compute_fid(self) -> Optional[float]:
        """FID of ``train.fid_num_images`` samples (split over ranks) against the reference
        statistics; the reference is made from decoded training tokens when its file is missing."""
        t = self.cfg.train
        if self.fid is None or self.tokenizer is None:
            if self.fid is not None and not getattr(self, "_fid_warned", False):
                log.warning("FID disabled: no tokenizer to decode samples (set data.tokenizer)")
                self._fid_warned = True
            return None
        if self.fid.extractor() is None:  # weights missing: logged once by the tracker
            return None
        acc, model = self.acc, self._eval_model()
        n = max(1, t.fid_num_images // acc.num_processes)
        bs = self.cfg.data.batch_size
        # The reference: decoded training tokens (the tokenizer's ceiling), made once when the file
        # is missing; the generator is not consumed when the file exists.
        n_real = min(n, len(self.data))
        real = (decode_tokens(self.tokenizer, self.data.take(slice(i, min(i + bs, n_real)))["tokens"].to(acc.device))
                for i in range(0, n_real, bs))
        self.fid.ensure_reference(real)

        def fakes():
            for first, m in fid_sample_batches(n, acc.process_index, bs):
                labels = None
                if self.cfg.model.num_classes > 0:  # global index mod classes: balanced over all ranks
                    labels = torch.arange(first, first + m, device=acc.device) % self.cfg.model.num_classes
                seed = t.seed * 1_000_003 + first  # one seed per global index: no two batches share noise
                yield decode_tokens(self.tokenizer, self._sample(model, labels, m, seed))

        with eval_mode(model):
            return self.fid.compute(fakes())

    def evaluate(self) -> dict:
        """Rank 0 writes the pictures; their paths are returned (FID: ``TrainLoop._after_step``)."""
        result = {}
        if self.acc.is_main_process:
            result.update({k: str(v) for k, v in self.write_pictures().items()})
        self.acc.wait_for_everyone()
        return result

    # ------------------------------------------------------------------ logs
    def _lr(self) -> float:
        return self.sched.get_last_lr()[0]

    def _progress_postfix(self, out: dict) -> dict:
        return {"loss": f"{out.get('loss', math.nan):.4f}", "acc": f"{out.get('accuracy', math.nan):.3f}"}


__all__ = [
    "PriorTrainer", "save_prior", "load_prior", "resolve_prior", "load_decoder",
    "resolve_model_shape", "decode_tokens", "token_map_images", "shade_cells", "class_cycle", "grid_columns",
    "rows_of", "fid_sample_batches",
]
