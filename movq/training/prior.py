"""The prior's trainer, for both priors (``kind``): MaskGIT (Chang et al. 2022) and the autoregressive
transformer (Esser et al. 2021), on Accelerate.

One optimizer step (:meth:`PriorTrainer.train_step`) is ``train.grad_accum`` micro-batches of the
prior's ``training_loss`` (MaskGIT: masked-token cross-entropy; autoregressive: next-token
cross-entropy, logged also as ``bits_per_token``), then AdamW over its ``param_groups`` (decay on
matrices only) with linear warmup and ``train.lr_schedule``. Every ``train.eval_every`` steps rank 0 writes a grid of samples
(decoded with the tokenizer, else token maps) and an editing example from the EMA model: MaskGIT
inpaints the centre of real token maps; the autoregressive prior, which cannot fill an arbitrary box
(a token only sees the tokens before it), completes their bottom half from the top half. Every
``train.fid_every`` steps all ranks compute FID when the Inception weights are present. The schedule
around the step is :class:`movq.training.loop.TrainLoop`, with the same guarantees as the tokenizer's
trainer: every rank reads its own share of the token shards, only rank 0 writes, checkpoints are
atomic and a resume is bit-exact on CPU.

An image-conditional prior (``model.condition``) trains on a token folder made with the same condition
(``tools/tokenize_dataset.py --condition``; kind and parameters are checked, the condition's size is taken
from the folder); each batch's conditions go into ``training_loss``, and the sample grids, the editing
example and FID take their conditions from the token folder (sample i: the condition of training sample
i mod N), so a grid shows each condition above its sample.

A checkpoint's ``model/`` and ``ema/`` are model folders of the prior (``MaskGIT.from_pretrained`` /
``AutoregressivePrior.from_pretrained``, or :func:`movq.generation.sampler.load_prior` for either) with
their sampling defaults, tokenizer and class names in ``generation_config.json``
(:mod:`movq.generation.sampler`).
"""
from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from accelerate import Accelerator
from torch import Tensor, nn

from movq.config import PriorConfig, check_config
from movq.data.conditions import condition_pictures
from movq.data.tokens import TokenDataset, manifest_condition, read_token_manifest
from movq.evaluation.visualize import save_grid
from movq.generation import autoregressive as ar_sampling
from movq.generation.maskgit import box_mask, generate
from movq.generation.sampler import (
    Prior,
    SamplingDefaults,
    batch_seed,
    grid_columns,
    load_tokenizer_for,
    plan_batches,
    rows_of,
    sample_labels,
    sample_prior,
    save_sampling_defaults,
    shade_cells,
    token_map_images,
    tokens_to_images,
)
from movq.models.autoregressive import AutoregressivePrior
from movq.models.maskgit import MaskGIT
from movq.training.loop import TrainLoop, mean_micro_logs
from movq.training.run import eval_mode, schedule_lambda
from movq.utils import load_weights

log = logging.getLogger(__name__)

# The inpainting example regenerates the centre of the token grid: half its height and width.
INPAINT_BOX = (0.25, 0.25, 0.75, 0.75)
PRIOR_MODELS = {"maskgit": MaskGIT, "autoregressive": AutoregressivePrior}


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


def resolve_condition(cfg: PriorConfig, manifest: dict, where: str) -> PriorConfig:
    """Check ``model.condition`` against the token folder's (kind and parameters must match; a null
    ``size`` is set from the folder). An unconditional model may train on a folder with conditions."""
    mine, theirs = cfg.model.condition, manifest_condition(manifest)
    if mine is None:
        if theirs is not None:
            log.info("the tokens in %s hold %s conditions; model.condition is null, so they are not used",
                     where, theirs["kind"])
        return cfg
    if theirs is None:
        raise ValueError(f"model.condition is {mine.params()} but the tokens in {where} hold no condition: tokenize "
                         f"with --condition {mine.kind} or set model.condition=null")
    folder = {k: theirs.get(k) for k in mine.params()}
    if folder != mine.params():
        raise ValueError(f"model.condition {mine.params()} differs from the condition of the tokens in {where} "
                         f"{ {k: v for k, v in theirs.items() if k not in ('shape', 'labels_from')} }: set model.condition "
                         "to match, or tokenize again with these settings")
    size = tuple(int(v) for v in theirs["shape"][1:])
    if int(theirs["shape"][0]) != mine.channels:
        raise ValueError(f"the {mine.kind} conditions in {where} have {theirs['shape'][0]} channels, expected {mine.channels}")
    if mine.size is None:
        cfg.model = dataclasses.replace(cfg.model, condition=dataclasses.replace(mine, size=size))
    elif tuple(mine.size) != size:
        raise ValueError(f"model.condition.size {list(mine.size)} differs from the conditions in {where} ({list(size)}): "
                         "set model.condition.size=null to take the folder's")
    return cfg


class _TrainingLoss(nn.Module):
    """Puts ``training_loss`` behind ``forward``, so DDP's gradient hooks see the call."""

    def __init__(self, prior: Prior):
        super().__init__()
        self.prior = prior

    def forward(self, tokens: Tensor, labels: Optional[Tensor], condition: Optional[Tensor] = None):
        if condition is None:
            return self.prior.training_loss(tokens, labels)
        return self.prior.training_loss(tokens, labels, condition=condition)


class PriorTrainer(TrainLoop):
    """Builds everything from a ``PriorConfig``; ``fit()`` trains to ``train.max_steps``."""

    unit = "samples"

    def __init__(self, cfg: PriorConfig, accelerator: Optional[Accelerator] = None):
        check_config(cfg)
        if not cfg.data.tokens:
            raise ValueError("data.tokens must name a token folder (made by tools/tokenize_dataset.py)")
        if cfg.kind == "autoregressive" and cfg.sample.cfg_schedule != "constant":
            raise ValueError(f"sample.cfg_schedule={cfg.sample.cfg_schedule} is a MaskGIT setting: the autoregressive "
                             "prior guides every token with one scale (set sample.cfg_schedule=constant)")
        self.manifest = manifest = read_token_manifest(cfg.data.tokens)
        cfg = resolve_model_shape(cfg, manifest, cfg.data.tokens)
        cfg = resolve_condition(cfg, manifest, cfg.data.tokens)
        made_by = manifest.get("tokenizer")
        if cfg.data.tokenizer is None and made_by and Path(made_by).is_dir():
            cfg.data.tokenizer = made_by  # stored in the run's config and the sampling defaults
        super().__init__(cfg, accelerator)

    def build(self) -> None:
        acc, cfg, t = self.acc, self.cfg, self.cfg.train
        self.data = TokenDataset(cfg.data.tokens, rank=acc.process_index, world_size=acc.num_processes,
                                 verify=cfg.data.verify)
        prior = PRIOR_MODELS[cfg.kind](cfg.model)
        self.ema = self.make_ema(prior)
        opt = torch.optim.AdamW(prior.param_groups(t.weight_decay), lr=t.lr, betas=t.betas)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule_lambda(t))
        self.model, self.optimizer, self.sched = acc.prepare(_TrainingLoss(prior), opt, sched)
        self.tokenizer = load_tokenizer_for(prior, cfg.data.tokenizer, acc.device) if cfg.data.tokenizer else None

    @property
    def prior(self) -> Prior:
        return self.acc.unwrap_model(self.model).prior

    # ------------------------------------------------------------------ checkpoints
    def write_weights(self, folder: Path) -> None:
        defaults = SamplingDefaults(self.cfg.sample, self.cfg.data.tokenizer, self.manifest.get("tokenizer_sha256"),
                                    list(self.manifest["classes"]))
        for name, model in (("model", self.prior), ("ema", self.ema.model if self.ema is not None else None)):
            if model is not None:
                model.save_pretrained(folder / name)
                save_sampling_defaults(folder / name, defaults)

    def read_weights(self, folder: Path) -> None:
        load_weights(self.prior, folder / "model" / "model.safetensors")
        if self.ema is not None:
            load_weights(self.ema.model, folder / "ema" / "model.safetensors")

    # ------------------------------------------------------------------ one optimizer step
    def batches(self, start: int) -> Iterator[dict]:
        return self.data.batches(self.cfg.data.batch_size, self.cfg.data.seed, start_step=start)

    def _labels(self, batch: dict) -> Optional[Tensor]:
        return batch["label"].to(self.acc.device) if self.cfg.model.num_classes > 0 else None

    def _conditions(self, batch: dict) -> Optional[Tensor]:
        return batch["condition"].to(self.acc.device) if self.cfg.model.condition is not None else None

    def _conditions_of(self, index: np.ndarray) -> Optional[Tensor]:
        """The conditions of samples ``index`` (grids, FID): training sample ``i mod N``'s."""
        if self.cfg.model.condition is None:
            return None
        return self._conditions(self.data.take(np.asarray(index) % len(self.data)))

    def train_step(self, micro_batches: list[dict]) -> Optional[dict]:
        """The prior's loss on every micro-batch, then clip, check and step."""
        acc, t = self.acc, self.cfg.train
        keep = self.forward_state(self.model)  # a skipped step leaves no trace in any buffer
        micro = []
        for batch in micro_batches:
            tokens = batch["tokens"].to(acc.device, non_blocking=True)
            with acc.accumulate(self.model):
                with acc.autocast():
                    loss, logs = self.model(tokens, self._labels(batch), self._conditions(batch))
                acc.backward(loss)
            micro.append(logs)
        logs = mean_micro_logs(micro)
        norm = acc.clip_grad_norm_(self.model.parameters(), t.grad_clip if t.grad_clip > 0 else math.inf)
        ok = self.finite(logs["loss"], norm)
        if ok:
            self.optimizer.step()
            self.sched.step()
            if self.ema is not None:
                self.ema.update(self.prior)
        else:
            keep.restore()
        self.optimizer.zero_grad(set_to_none=True)
        logs["grad_norm"] = norm
        return logs if ok else None

    # ------------------------------------------------------------------ evaluation
    def _eval_model(self) -> Prior:
        return self.ema.model if self.ema is not None else self.prior

    def _sample(self, model: Prior, labels: Optional[Tensor], n: int, seed: int,
                condition: Optional[Tensor] = None) -> Tensor:
        s = self.cfg.sample
        if labels is None and condition is None:  # unconditional: nothing to guide towards
            s = dataclasses.replace(s, cfg_scale=1.0)
        g = torch.Generator(self.acc.device).manual_seed(seed)
        with self.acc.autocast():  # the training precision (bf16 on GPU runs)
            return sample_prior(model, labels, s, num_samples=n, generator=g, condition=condition)

    def _edit(self, model: Prior, real: Tensor, labels: Optional[Tensor], seed: int,
              condition: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """The editing example on real token maps: ``(filled tokens, known bool [h, w])``. MaskGIT
        regenerates the centre box (``INPAINT_BOX``); the autoregressive prior the bottom half."""
        s, (h, w), n = self.cfg.sample, self.cfg.model.grid_hw, real.shape[0]
        scale = s.cfg_scale if labels is not None or condition is not None else 1.0
        g = torch.Generator(self.acc.device).manual_seed(seed)
        if self.cfg.kind == "autoregressive":
            known = torch.zeros(h, w, dtype=torch.bool, device=real.device)
            known[: h // 2] = True
            with self.acc.autocast():
                filled = ar_sampling.sample(model, labels, num_samples=n, generator=g, temperature=s.temperature,
                                            top_k=s.top_k, top_p=s.top_p, cfg_scale=scale, prompt=real,
                                            prompt_cells=(h // 2) * w, condition=condition)
            return filled, known
        box = (INPAINT_BOX[0] * w, INPAINT_BOX[1] * h, INPAINT_BOX[2] * w, INPAINT_BOX[3] * h)
        known = box_mask(h, w, box, image_size=(h, w), inside=True).to(real.device)
        with self.acc.autocast():
            filled = generate(model, labels, num_samples=n, generator=g, tokens=real, known_mask=known,
                              steps=s.steps, temperature=s.temperature, choice_temperature=s.choice_temperature,
                              cfg_scale=scale, cfg_schedule=s.cfg_schedule, schedule=model.config.mask_schedule,
                              condition=condition)
        return filled, known

    def _condition_pictures(self, conditions: Tensor, size) -> Tensor:
        return condition_pictures(self.cfg.model.condition, conditions, tuple(size))

    def _pictures(self, tokens: Tensor) -> Tensor:
        if self.tokenizer is not None:
            return tokens_to_images(self.tokenizer, tokens).cpu()
        return token_map_images(tokens, self.cfg.model.codebook_size)

    @torch.no_grad()
    def write_pictures(self) -> dict[str, Path]:
        """Rank 0: a grid of samples (one class per column cycle) and the editing example (MaskGIT:
        inpainting, autoregressive: completion; rows: originals, the known part, the prior's result), as PNG files (their paths
        are returned) and to the trackers."""
        model, s, dev = self._eval_model(), self.cfg.sample, self.acc.device
        out, pictures = {}, {}
        with eval_mode(model):
            if s.grid_images > 0:
                rule = "cycle" if self.cfg.model.num_classes > 0 else "null"
                labels = sample_labels(rule, self.cfg.model.num_classes, np.arange(s.grid_images), dev)
                conds = self._conditions_of(np.arange(s.grid_images))
                tokens = self._sample(model, labels, s.grid_images, self.cfg.train.seed, conds)
                out["samples"] = self.run.images / f"samples_{self.step:07d}.png"
                rows = rows_of(self._pictures(tokens), grid_columns(self.cfg.model.num_classes))
                if conds is not None:  # each row of samples below a row of their conditions
                    shown = self._condition_pictures(conds, rows[0].shape[-2:])
                    rows = [r for pair in zip(rows_of(shown, len(rows[0])), rows) for r in pair]
                pictures["images/samples"] = save_grid(rows, out["samples"])
            n = min(s.inpaint_images, len(self.data))
            if n > 0:
                first = self.data.take(slice(0, n))
                real, labels = first["tokens"].to(dev), self._labels(first)
                filled, known = self._edit(model, real, labels, self.cfg.train.seed + 1, self._conditions(first))
                pics = self._pictures(torch.cat([real, filled]))
                orig, new = pics[:n], pics[n:]
                name = "complete" if self.cfg.kind == "autoregressive" else "inpaint"
                out[name] = self.run.images / f"{name}_{self.step:07d}.png"
                pictures[f"images/{name}"] = save_grid([orig, shade_cells(orig, known[None].cpu()), new], out[name])
        self.log_images(pictures)
        return out

    @torch.no_grad()
    def compute_fid(self) -> Optional[float]:
        """FID of ``train.fid_num_images`` samples (split over ranks by the sampler's index rule, classes
        cycling with the index) against the reference statistics; the reference is made from decoded
        training tokens when its file is missing."""
        t = self.cfg.train
        if self.fid is None or self.tokenizer is None:
            if self.fid is not None and not getattr(self, "_fid_warned", False):
                log.warning("FID disabled: no tokenizer to decode samples (set data.tokenizer)")
                self._fid_warned = True
            return None
        if self.fid.extractor() is None:  # weights missing: logged once by the tracker
            return None
        acc, model = self.acc, self._eval_model()
        bs, nc = self.cfg.data.batch_size, self.cfg.model.num_classes
        plan = plan_batches(t.fid_num_images, acc.process_index, acc.num_processes, bs)
        # The reference: decoded training tokens (the tokenizer's ceiling), as many per rank as it samples,
        # made once when the file is missing; the generator is not consumed when the file exists.
        n_real = min(sum(int((b < t.fid_num_images).sum()) for b in plan), len(self.data))
        real = (tokens_to_images(self.tokenizer, self.data.take(slice(i, min(i + bs, n_real)))["tokens"].to(acc.device))
                for i in range(0, n_real, bs))
        self.fid.ensure_reference(real)

        def fakes():
            for index in plan:
                labels = sample_labels("cycle" if nc > 0 else "null", nc, index, acc.device)
                tokens = self._sample(model, labels, len(index), batch_seed(t.seed, int(index[0])),
                                      self._conditions_of(index))
                yield tokens_to_images(self.tokenizer, tokens[: int((index < t.fid_num_images).sum())])

        with eval_mode(model):
            return self.fid.compute(fakes())

    def evaluate(self) -> dict:
        """Rank 0 writes the pictures; their paths are returned (FID: ``TrainLoop._fid_record``)."""
        result = {}
        if self.acc.is_main_process:
            result.update({k: str(v) for k, v in self.write_pictures().items()})
        self.acc.wait_for_everyone()
        return result
