"""Evaluation inside training (``[eval]``): sample quality of the EMA model every N steps.

VDM++ App. H picks its reported checkpoint by the FID measured during training; this module
does that in the loop. Seeds ``0 .. count-1`` are split over the ranks (``seeds[rank::world]``)
and each image depends on its seed only (``vdmpp.samplers.PerSampleGenerator``), so the score
does not depend on the world size. Rank 0 scores the gathered images — the digits classifier's
Fréchet distance and class accuracy, or Inception FID through torch-fidelity — optionally adds
VDM's bound on held-out data, and keeps ``RUN/best.json``. The sampling and scoring code is
vdmpp-eval's (an optional dependency, checked at start-up).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .config import Config
from .distributed import Dist
from .errors import ConfigError
from .fileio import write_json_atomic

__all__ = ["BEST", "InTrainingEval"]

BEST = "best.json"


class InTrainingEval:
    """Built at start-up (every check before the first step); :meth:`run` at each interval."""

    def __init__(self, cfg: Config, d: Dist, out: Path) -> None:
        self.cfg, self.d, self.out = cfg, d, out
        v = cfg.eval
        self.every = v.every
        try:
            from vdmpp.eval import data as eval_data
            from vdmpp.eval import metrics as eval_metrics
            from vdmpp.eval.model import EvalError
            from vdmpp.eval.spec import SampleSpec
        except ImportError as e:
            raise ConfigError(
                f"config: eval.every = {v.every} needs vdmpp-eval ({e}): pip install vdmpp-eval "
                "(or ./apps/eval), or set eval.every = 0"
            ) from None
        try:
            self.spec = SampleSpec(sampler=v.sampler, steps=v.steps).check()
            r = cfg.data.resolution
            if v.metric == "digits":
                if cfg.data.channels != 1:
                    raise ConfigError(
                        f"config: eval.metric = 'digits' scores 1-channel images; the data has "
                        f"{cfg.data.channels} channels: use eval.metric = 'fid'"
                    )
                from vdmpp.eval import digits

                self.reference, _ = eval_data.load_images("digits", resolution=r)
                self.weights = None
                digits.classifier_path()  # trained once and cached now, not mid-run
            else:
                if not v.fid_weights or not v.fid_reference:
                    raise ConfigError(
                        "config: eval.metric = 'fid' needs eval.fid_weights (a local Inception "
                        f"weights file; download {eval_metrics.INCEPTION_URL}) and "
                        "eval.fid_reference (reference images: .npz, shards or a folder)"
                    )
                self.weights = eval_metrics.inception_weights(v.fid_weights, required=True)
                self.reference, _ = eval_data.load_images(v.fid_reference, resolution=r)
            self.held_out = None
            if v.bpd:
                images, labels = eval_data.load_images(
                    v.bpd_data, resolution=r, num_classes=cfg.data.num_classes
                )
                self.held_out = (images[: v.bpd_limit], labels[: v.bpd_limit])
        except EvalError as e:
            raise ConfigError(f"config: [eval]: {e}") from None
        self.best = _read_best(out / BEST)

    def due(self, step: int, last: bool) -> bool:
        return self.every > 0 and (step % self.every == 0 or last)

    def run(
        self, step: int, ema: nn.Module, meta: dict[str, Any]
    ) -> tuple[dict[str, Any] | None, bool]:
        """Every rank samples its share; (the metrics row on rank 0, else None; whether it is
        the best so far — the same on every rank)."""
        from vdmpp.eval.sampling import generate

        t0 = time.time()
        v, d = self.cfg.eval, self.d
        mine = list(range(v.count))[d.rank :: d.world]
        was_training = ema.training
        ema.eval()
        with torch.no_grad():
            images, labels, nfe = generate(
                ema, meta, mine, self.spec, device=d.device, batch_size=v.batch
            )
        ema.train(was_training)
        parts = d.all_gather_object((mine, images, labels))
        row = self._rank0(step, parts, nfe, ema, meta, t0) if d.main else None
        best = d.all_gather_object(self.best)[0]  # rank 0's verdict, on every rank
        is_best = best is not None and best["step"] == step
        self.best = best
        return row, is_best

    def _rank0(
        self, step: int, parts: list, nfe: int, ema: nn.Module, meta: dict, t0: float
    ) -> dict[str, Any]:
        v = self.cfg.eval
        order = np.argsort(np.concatenate([np.asarray(s, dtype=np.int64) for s, _, _ in parts]))
        images = np.concatenate([im for _, im, _ in parts])[order]
        has_labels = parts[0][2] is not None
        labels = np.concatenate([lb for _, _, lb in parts])[order] if has_labels else None
        row: dict[str, Any] = {"step": step, **self._score(images, labels)}
        row.update(eval_count=len(images), eval_sampler=v.sampler, eval_nfe=nfe)
        if self.held_out is not None:
            row["eval_bpd"] = self._bpd(ema, meta)
        row["eval_time_s"] = time.time() - t0
        if self.best is None or row["eval_value"] < self.best["value"]:
            self.best = {"step": step, "metric": row["eval_metric"], "value": row["eval_value"]}
            write_json_atomic(self.out / BEST, self.best)
            row["eval_best"] = True
        return row

    @staticmethod
    def describe(row: dict[str, Any]) -> str:
        """The log line of an evaluation row."""
        acc = f", accuracy {row['eval_accuracy']:.3f}" if "eval_accuracy" in row else ""
        bpd = f", {row['eval_bpd']:.3f} bits/dim" if "eval_bpd" in row else ""
        return (
            f"eval at step {row['step']}: {row['eval_metric']} {row['eval_value']:.4g}{acc}"
            f"{bpd} ({row['eval_count']} samples, {row['eval_time_s']:.1f} s)"
            + (" — best so far" if row.get("eval_best") else "")
        )

    def _score(self, images: np.ndarray, labels: np.ndarray | None) -> dict[str, Any]:
        from vdmpp.eval import metrics as M

        cuda = self.d.device.type == "cuda"
        if self.weights is None:
            from vdmpp.eval import digits

            d = M.compute_metrics(
                images, self.reference, extractor="digits", metrics=("fid",), cuda=cuda
            )
            out = {"eval_metric": "digits_fd", "eval_value": float(d["fid"])}
            if labels is not None:
                out["eval_accuracy"] = float((digits.predict(images) == labels).mean())
            return out
        d = M.compute_metrics(
            images, self.reference, weights=self.weights, metrics=("fid",), cuda=cuda
        )
        return {"eval_metric": "fid", "eval_value": float(d["fid"])}

    def _bpd(self, ema: nn.Module, meta: dict[str, Any]) -> float:
        from vdmpp.eval.bpd import bpd_of_export

        images, labels = self.held_out
        r = bpd_of_export(
            ema, meta, images, labels, batch_size=self.cfg.eval.batch, seed=0, progress=False
        )
        return float(r.bpd)


def _read_best(path: Path) -> dict[str, Any] | None:
    """``RUN/best.json`` of an earlier session of this run (a damaged one is ignored)."""
    try:
        best = json.loads(path.read_text())
        return best if isinstance(best.get("value"), float | int) else None
    except (OSError, ValueError, AttributeError):
        return None
