"""Training with label dropout (issue 22): ``objective.label_dropout = p`` replaces a label by
the null class (row ``num_classes`` of ``model.net.class_emb``, what ``class_labels=None``
selects at sampling) with probability p, drawn from the step's seeded generator.

What eval's refusal of ``--guidance`` on a ``label_dropout = 0`` model rests on: with p > 0 the
null row receives gradient, moves, and the null-class loss falls; with p = 0 it never receives
any gradient and stays bit-identical to its initialization.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from vdmpp.train import config as C
from vdmpp.train.objective import Objective
from vdmpp.train.trainer import Trainer

NUM_CLASSES = 10  # digits


def _trainer(tmp_path, small, p: float, *sets: str) -> Trainer:
    overrides = [*small, "steps=100", f"objective.label_dropout={p}", f"out='{tmp_path}/p{p}'"]
    return Trainer(C.load("digits", [*overrides, *sets]))


@torch.no_grad()
def _null_mse(model: nn.Module, x, lam, noise) -> float:
    """‖D(z; λ, null class) − x‖² on a fixed batch, noise and λ grid (VP: α² = sigmoid(λ))."""
    a = torch.sigmoid(lam).sqrt().view(-1, 1, 1, 1)
    s = torch.sigmoid(-lam).sqrt().view(-1, 1, 1, 1)
    return float((model.denoise(a * x + s * noise, lam, None) - x).square().mean())


@pytest.mark.parametrize("p", [0.0, 0.2])
def test_null_class_row_trains_only_with_label_dropout(tmp_path, small, p) -> None:
    torch.set_num_threads(1)
    tr = _trainer(tmp_path, small, p, "batch.global=16")
    try:
        emb = tr.model.net.class_emb
        assert emb.num_embeddings == NUM_CLASSES + 1  # row NUM_CLASSES: the null class
        init = emb.weight.detach().clone()
        grads: list[torch.Tensor] = []
        emb.weight.register_hook(lambda g: grads.append(g[NUM_CLASSES].detach().clone()))
        # a fixed evaluation batch, noise and λ grid for the null-class (unconditional) loss
        x, _ = tr.data.batch(0, None)
        x = x.repeat(4, 1, 1, 1)
        lam = torch.linspace(-4.0, 4.0, x.shape[0])
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
        before = _null_mse(tr.model, x, lam, noise)
        steps = 40
        for _ in range(steps):
            assert tr.train_step()["ok"]
        after = _null_mse(tr.model, x, lam, noise)
        assert len(grads) == steps
        row = emb.weight.detach()
        assert not torch.equal(row[:NUM_CLASSES], init[:NUM_CLASSES])  # the classes train
        if p == 0:
            assert all(torch.count_nonzero(g) == 0 for g in grads)
            assert torch.equal(row[NUM_CLASSES], init[NUM_CLASSES])  # bit for bit
            assert torch.equal(tr.ema.module.net.class_emb.weight[NUM_CLASSES], init[NUM_CLASSES])
            return
        # p = 0.2 of 16 labels: a step without a dropped label has probability 0.8^16 ≈ 2.8 %
        with_grad = sum(bool(torch.count_nonzero(g)) for g in grads)
        assert with_grad >= steps // 2, with_grad
        assert not torch.equal(row[NUM_CLASSES], init[NUM_CLASSES])
        assert after < 0.75 * before, (before, after)  # the null-class loss falls
        # ... and the null row's own training is part of that: put its initial value back
        # into the trained network and the null-class loss is higher
        with torch.no_grad():
            trained = row[NUM_CLASSES].clone()
            emb.weight[NUM_CLASSES] = init[NUM_CLASSES]
            reset = _null_mse(tr.model, x, lam, noise)
            emb.weight[NUM_CLASSES] = trained
        assert after < reset, (after, reset)
    finally:
        tr.close()


class _Recorder(nn.Module):
    """A stand-in network: records the class labels it is called with, predicts zeros."""

    def __init__(self) -> None:
        super().__init__()
        self.labels: list[torch.Tensor] = []

    def forward(self, z, logsnr, class_labels=None):
        self.labels.append(class_labels.clone())
        return torch.zeros_like(z)


def _masks(p: float, seed: int, labels: torch.Tensor, global_seed: int) -> torch.Tensor:
    cfg = C.load("digits", [f"objective.label_dropout={p}"])
    obj = Objective(cfg)
    rec = _Recorder()
    torch.manual_seed(global_seed)  # the global RNG must play no part
    x = torch.zeros(labels.shape[0], 1, 8, 8)
    gen = torch.Generator().manual_seed(seed)
    obj(rec, x, labels, gen)
    (seen,) = rec.labels
    return seen


def test_dropout_mask_comes_from_the_steps_generator() -> None:
    n, p = 20_000, 0.1
    labels = torch.arange(n) % NUM_CLASSES
    a = _masks(p, seed=7, labels=labels, global_seed=0)
    b = _masks(p, seed=7, labels=labels, global_seed=123)
    c = _masks(p, seed=8, labels=labels, global_seed=0)
    assert torch.equal(a, b)  # same step seed → same mask, whatever the global RNG
    assert not torch.equal(a, c)
    dropped = a == NUM_CLASSES
    assert torch.equal(a[~dropped], labels[~dropped])  # the others keep their label
    se = math.sqrt(p * (1 - p) / n)
    for m in (a, c):
        frac = (m == NUM_CLASSES).double().mean().item()
        assert abs(frac - p) < 4 * se, (frac, p, se)
    # p = 0: labels pass through untouched, and nothing is drawn from the generator for them
    assert torch.equal(_masks(0.0, seed=7, labels=labels, global_seed=0), labels)


@pytest.mark.parametrize("p", [0.0, 0.1])
def test_p_zero_draws_nothing_extra_from_the_generator(p) -> None:
    """p = 0 keeps today's runs bit-identical: the step's t and ε are what WeightedLoss alone
    draws; p > 0 draws the mask first (so its t and ε differ)."""
    obj = Objective(C.load("digits", [f"objective.label_dropout={p}"]))
    x = torch.zeros(64, 1, 8, 8)
    labels = torch.arange(64) % NUM_CLASSES
    g_obj, g_loss = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    _, lam_obj, _ = obj(_Recorder(), x, labels, g_obj)
    plain = obj.loss(_Recorder(), x, labels, generator=g_loss)
    same = torch.equal(g_obj.get_state(), g_loss.get_state())
    assert same == (p == 0)
    assert torch.equal(lam_obj, plain.logsnr) == (p == 0)
