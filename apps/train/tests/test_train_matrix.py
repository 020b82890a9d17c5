"""The config space, generated from the libraries' registries: every combination trains,
exports, samples with every sampler and gets a finite bits/dim.

Factors (each enumerated from a registry, never a hand-kept list):

* schedule: every schedule class ``vdmpp.schedules`` exports (``schedule_names()``: fixed ones,
  ``linear_logsnr`` and ``learned`` included) plus VDM++'s adaptive schedule (App. F);
* weighting: every name in ``vdmpp.losses.weightings.names()``, with and without a shift
  (App. D.2.1; the shift for this resolution, s = log(64/8));
* parameterization / process: ``vdmpp.models.PARAMETERIZATIONS`` × ``PROCESSES``;
* precision: the config's ``PRECISIONS``; time sampler: ``TIME_SAMPLERS``; class-conditional
  (10 classes) or unconditional.

Coverage. The full product is 8 × 11 × 2 × 4 × 2 × 2 × 2 × 2 = 11264 cells (with today's
registries). CI runs a *pairwise* covering set (every value of every factor meets every value
of every other factor at least once: 88 cells today = 8 × 11, the least any pairwise set can
have, 0.8 % of the product; ``test_pairwise_covers_every_pair`` checks the coverage) through
the fast in-process path (about 100 s of CPU on one thread): the trainer's
own ``Objective``/``build_net``, 4 Adam steps on 16 digits, the trainer's own ``export`` and
the eval app's loader, every eval sampler and the bits/dim estimator. Set
``VDMPP_FULL_MATRIX=1`` to run all cells instead (about an hour on 2 cores).

The loss is checked where it means something: the weighted loss under a *fixed* importance
distribution (λ uniform, fixed t and ε) — which has the training objective's expectation for any
schedule (VDM++ Sec. 3.2) — must fall over the steps on the batch it trains on.
"""

from __future__ import annotations

import itertools
import math
import os
import types
from pathlib import Path

import pytest
import torch

from vdmpp.train import config as C
from vdmpp.train.objective import (
    Objective,
    build_net,
    parameterization_names,
    process_names,
    schedule_names,
    weighting_names,
)

SHIFT = math.log(64 / 8)  # App. D.2.1: s = log(64/d) at the digits' 8×8
TINY = {
    "model_channels": 16,
    "channel_mult": [1, 2],
    "num_res_blocks": 1,
    "attention_resolutions": [],
    "head_channels": 16,
}
STEPS = 4


def factors() -> dict[str, list]:
    """Every factor of the config space, read from the registries."""
    return {
        "schedule": [*schedule_names(), "adaptive"],
        "weighting": weighting_names(),
        "shift": [0.0, SHIFT],
        "parameterization": list(parameterization_names()),
        "process": list(process_names()),
        "precision": list(C.PRECISIONS),
        "time_sampler": list(C.TIME_SAMPLERS),
        "num_classes": [10, None],  # class-conditional or not
    }


def pairwise(f: dict[str, list]) -> list[dict]:
    """A deterministic greedy covering array of strength 2 (AETG-style, first-fit on ties)."""
    names = list(f)
    uncovered = {
        (a, va, b, vb) for a, b in itertools.combinations(names, 2) for va in f[a] for vb in f[b]
    }
    rows: list[dict] = []
    while uncovered:
        a, va, b, vb = min(
            uncovered,
            key=lambda p: (
                names.index(p[0]),
                names.index(p[2]),
                f[p[0]].index(p[1]),
                f[p[2]].index(p[3]),
            ),
        )
        row = {a: va, b: vb}
        for n in names:
            if n in row:
                continue
            best = max(
                f[n],
                key=lambda v: sum(
                    ((m, row[m], n, v) if names.index(m) < names.index(n) else (n, v, m, row[m]))
                    in uncovered
                    for m in row
                ),
            )
            row[n] = best
        for x, y in itertools.combinations(names, 2):
            uncovered.discard((x, row[x], y, row[y]))
        rows.append(row)
    return rows


def cells() -> list[dict]:
    f = factors()
    if os.environ.get("VDMPP_FULL_MATRIX") == "1":
        return [dict(zip(f, v)) for v in itertools.product(*f.values())]
    return pairwise(f)


def _cid(c: dict) -> str:
    return "-".join(f"{v:.2g}" if isinstance(v, float) else str(v) for v in c.values())


def config_for(c: dict) -> C.Config:
    adaptive = c["schedule"] == "adaptive"
    return C.from_dict(
        {
            "precision": c["precision"],
            "data": {"resolution": 8, "num_classes": c["num_classes"]},
            "model": {"name": "tiny", "overrides": dict(TINY)},
            "objective": {
                "schedule": "cosine" if adaptive else c["schedule"],
                "adaptive": adaptive,
                "adaptive_decay": 0.9,
                "weighting": c["weighting"],
                "weighting_args": {"shift": c["shift"]} if c["shift"] else {},
                "parameterization": c["parameterization"],
                "process": c["process"],
                "time_sampler": c["time_sampler"],
                "logsnr_min": -15.0,
                "logsnr_max": 15.0,
            },
        }
    ).validate()


def test_pairwise_covers_every_pair() -> None:
    """The covering set really covers every pair of the product, and is far smaller than it."""
    f = factors()
    rows = pairwise(f)
    for a, b in itertools.combinations(f, 2):
        seen = {(r[a], r[b]) for r in rows}
        assert seen == set(itertools.product(f[a], f[b])), (a, b)
    full = math.prod(len(v) for v in f.values())
    assert (
        len(f["schedule"]) >= 8 and "linear_logsnr" in f["schedule"] and "learned" in f["schedule"]
    )
    assert len(f["weighting"]) >= 11
    assert len(rows) < full / 20, (len(rows), full)


@pytest.fixture(scope="module")
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    from vdmpp.train.data import digits_images

    imgs, labels = digits_images(8, "train")
    x = torch.from_numpy(imgs[:16]).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return x, torch.from_numpy(labels[:16])


def _fixed_loss(obj: Objective, cfg: C.Config, net, x, y) -> float:
    """Eq. 7 with λ uniform on the config's range and fixed (t, ε): schedule-independent."""
    from vdmpp.losses import WeightedLoss
    from vdmpp.schedules import LinearLogSNR

    o = cfg.objective
    probe = WeightedLoss(
        LinearLogSNR(logsnr_min=o.logsnr_min, logsnr_max=o.logsnr_max),
        obj.loss.weighting,
        o.parameterization,
        o.process,
        sigma_data=o.sigma_data,
    )
    g = torch.Generator().manual_seed(123)
    t = (torch.arange(64, dtype=torch.float32) + 0.5) / 64
    xs, ys = x.repeat(4, 1, 1, 1), (y.repeat(4) if y is not None else None)
    noise = torch.randn(xs.shape, generator=g)
    with torch.no_grad():
        return float(probe(net, xs, ys, t=t, noise=noise).loss.mean())


@pytest.mark.parametrize("cell", cells(), ids=_cid)
def test_cell_trains_exports_samples_and_bounds(cell, batch, tmp_path) -> None:
    import vdmpp.samplers as S
    from vdmpp.eval.bpd import bpd_of_export
    from vdmpp.eval.model import denoiser_for, load_model, to_uint8
    from vdmpp.train.trainer import Trainer

    torch.set_num_threads(1)
    cfg = config_for(cell)
    x, y = batch
    y = y if cell["num_classes"] else None
    torch.manual_seed(0)
    net, obj = build_net(cfg), Objective(cfg)
    params = list(net.parameters()) + list(obj.schedule.parameters())
    if cell["schedule"] == "learned":
        assert any(p.requires_grad for p in obj.schedule.parameters())
    opt = torch.optim.Adam(params, lr=2e-3)
    before = _fixed_loss(obj, cfg, net, x, y)
    gen = torch.Generator().manual_seed(0)
    bf16 = cfg.precision == "bf16"
    for _ in range(STEPS):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss, lam, mse = obj(net, x, y, gen)
        assert torch.isfinite(loss).all(), loss
        loss.mean().backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if hasattr(obj.schedule, "bin_stats"):
            obj.schedule.apply_stats(obj.schedule.bin_stats(lam, mse))
    after = _fixed_loss(obj, cfg, net, x, y)
    assert math.isfinite(before) and math.isfinite(after)
    assert after < before, (before, after)

    # the trainer's own export, read back by the eval app
    ema = types.SimpleNamespace(module=net.eval())
    run = types.SimpleNamespace(cfg=cfg, objective=obj, ema=ema, step=STEPS, out=tmp_path)
    run.export_meta = lambda: Trainer.export_meta(run)  # type: ignore[arg-type]
    Trainer.export(run)  # type: ignore[arg-type]
    model, meta = load_model(tmp_path / "export")
    assert (
        meta["parameterization"] == cell["parameterization"] and meta["process"] == cell["process"]
    )
    assert meta["schedule"]["name"] == cell["schedule"]
    assert meta["num_classes"] == cell["num_classes"]
    with torch.no_grad():
        for k, v in net.state_dict().items():
            assert torch.equal(model.state_dict()[k], v), k

    den = denoiser_for(model, meta)
    sigmas = S.karras_sigmas(3, 0.002, 80.0, 7.0)
    labels = torch.arange(4) % 10 if cell["num_classes"] else None
    for name, entry in S.SAMPLERS.items():  # every sampler the eval app offers
        g = torch.Generator().manual_seed(1)
        noise = torch.randn(4, 1, 8, 8, generator=g)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = entry.fn(den, noise, sigmas, generator=g, extra_args={"class_labels": labels})
        assert out.shape == noise.shape and torch.isfinite(out).all(), name

    images = to_uint8(x[:4])
    r = bpd_of_export(model, meta, images, batch[1][:4].numpy(), batch_size=4)
    assert math.isfinite(r.bpd) and r.bpd > 0, r


# --- the recipes a new user tries first, through the CLI on digits ------------------------------
RECIPES = {
    # digits.toml as shipped (the best VDM++ recipe of bench/objectives.py), nothing overridden.
    "shipped": [],
    # EDM (Karras et al. 2022): EDM training schedule, EDM weighting, F-parameterization.
    "edm": [
        "objective.adaptive=false",
        "objective.schedule=edm_training",
        "objective.weighting=edm",
        "objective.weighting_args={}",
        "objective.parameterization=edm",
    ],
    # v-prediction with the cosine schedule (VDM++ Table 1, 'v-MSE'): v-weighting e^{-λ/2}.
    "v-cosine": [
        "objective.adaptive=false",
        "objective.schedule=cosine",
        "objective.weighting=vprediction",
        "objective.weighting_args={}",
        "objective.parameterization=v",
    ],
    # Flow matching with the OT path (VDM++ App. D.3): flow_ot schedule and weighting, v head.
    "flow-ot": [
        "objective.adaptive=false",
        "objective.schedule=flow_ot",
        "objective.weighting=flowot",
        "objective.weighting_args={}",
        "objective.parameterization=v",
    ],
}


@pytest.mark.slow
@pytest.mark.parametrize("recipe", list(RECIPES))
def test_recipe_trains_on_digits_from_the_cli(recipe, cli, small, tmp_path) -> None:
    import json

    from vdmpp.train.export import load_exported

    run = tmp_path / "run"
    args = ["digits", "--set", "steps=40", "--set", f"out={run}", "--set", "checkpoint.every=40"]
    for s in [*small, *RECIPES[recipe], "sample.every=40", "sample.count=20", "sample.steps=3"]:
        args += ["--set", s]
    r = cli(args, cwd=Path(__file__).resolve().parents[3])
    assert r.returncode == 0, r.stderr[-3000:]
    m = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [x["loss"] for x in m]
    assert all(math.isfinite(v) for v in losses), losses
    first, last = sum(losses[:2]) / 2, sum(losses[-2:]) / 2
    assert last < 0.8 * first, losses
    _model, meta = load_exported(run)
    want = dict(s.split("=", 1) for s in RECIPES[recipe])
    shipped = C.load("digits")
    assert meta["schedule"]["name"] == want.get(
        "objective.schedule",
        "adaptive" if shipped.objective.adaptive else shipped.objective.schedule,
    )
    assert meta["parameterization"] == want.get(
        "objective.parameterization", shipped.objective.parameterization
    )
    # the preview goes through the one grid writer: classes as columns, upscaled, captioned
    from PIL import Image

    with Image.open(run / "samples" / "step-000000040.png") as im:
        assert "step 40" in im.text["Description"] and "heun 3 steps" in im.text["Description"]
        assert im.width == (10 * 9 + 1) * 8
