"""No host syncs and no host→device copies in a training step and a sampling call.

On a CPU there is no stream to stall, so the test records, at the dispatcher, every operation
that would stall or copy on an accelerator (what ``torch.cuda.set_sync_debug_mode("error")``
reports there): reads of a tensor's value on the host (``aten._local_scalar_dense`` behind
``.item()``/``bool()``/``float()``, ``aten.is_nonzero``), ops whose output shape depends on the
data (``nonzero``, ``masked_select``, ``unique``), and tensors made from host data
(``aten.lift_fresh`` behind ``torch.tensor([...])``: a host→device copy when the device is a GPU).

The libraries check NaN / [0, 1] inputs on the CPU only, where it is free, and skip the checks on
accelerators; those guard sites are named below and each is tested to skip non-CPU tensors.
Everything else found is a failure, kernels on and off. Scope: ``vdmpp.schedules`` (Learned,
Adaptive incl. the fused update pair), ``vdmpp.losses.WeightedLoss`` forward + backward and the
samplers' step loop. The optimizer is out of scope (torch.optim keeps its step count on the host
unless ``capturable=True``).
"""

from __future__ import annotations

import importlib.util
import traceback

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("vdmpp.losses") is None
    or importlib.util.find_spec("vdmpp.samplers") is None,
    reason="needs vdmpp-losses and vdmpp-samplers",
)

SYNCING = {
    "aten::_local_scalar_dense",
    "aten::is_nonzero",
    "aten::item",
    "aten::nonzero",
    "aten::masked_select",
    "aten::_unique2",
    "aten::unique_dim",
    "aten::unique_consecutive",
    "aten::lift_fresh",
    "aten::lift_fresh_copy",
}
# (file, function) of the CPU-only guards: each is skipped for accelerator tensors.
CPU_ONLY_GUARDS = {
    ("base.py", "check_unit_interval"),  # t ∈ [0, 1]
    ("adaptive.py", "bin_stats"),  # NaN λ is an error (reference path)
    ("_step.py", "all_finite"),  # the samplers' per-evaluation NaN check (CPU) / final check
}


class SyncRecorder(TorchDispatchMode):
    """Records every dispatcher op in SYNCING, with the innermost vdmpp frame that caused it."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[tuple[str, str, str, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        if name in SYNCING or (name in ("aten::_to_copy", "aten::copy_") and _cross(args, kwargs)):
            self.events.append((name, *_culprit()))
        return func(*args, **(kwargs or {}))

    def unexpected(self) -> list[tuple[str, str, str, int]]:
        return [e for e in self.events if (e[1], e[2]) not in CPU_ONLY_GUARDS]


def _cross(args, kwargs) -> bool:
    """A copy between two devices (always False on a CPU-only box, kept for GPU runs)."""
    ts = [a for a in args if isinstance(a, torch.Tensor)]
    dev = (kwargs or {}).get("device")
    if dev is not None and ts:
        return torch.device(dev) != ts[0].device
    return len(ts) >= 2 and ts[0].device != ts[1].device


def _culprit() -> tuple[str, str, int]:
    for f in reversed(traceback.extract_stack()):
        if "/vdmpp/" in f.filename:
            return f.filename.rsplit("/", 1)[-1], f.name, f.lineno
    return "?", "?", 0


class _TinyEps(nn.Module):
    """A λ-conditioned two-conv ε-network (the model itself is not under test)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, z, logsnr, class_labels=None):
        scale = torch.sigmoid(logsnr).view(-1, 1, 1, 1).to(z.dtype)
        return self.b(torch.nn.functional.silu(self.a(z))) * scale


@pytest.fixture(params=["kernels", "reference"])
def kernels_mode(request, monkeypatch):
    if request.param == "reference":
        monkeypatch.setenv("VDMPP_KERNELS", "0")
    else:
        monkeypatch.delenv("VDMPP_KERNELS", raising=False)
    return request.param


@pytest.mark.parametrize("schedule", ["adaptive", "learned"])
def test_training_step_has_no_host_sync(kernels_mode, schedule):
    """WeightedLoss forward + backward, and the adaptive update as the trainer runs it
    (add_stats per micro-batch → [all-reduce] → apply_stats) and as one call (update)."""
    import vdmpp.kernels as K
    from vdmpp.losses import WeightedLoss, weightings
    from vdmpp.schedules import Adaptive, Learned

    w = weightings.get("sigmoid", bias=2.0)
    sched = Adaptive(w, bins=100, logsnr_min=-15, logsnr_max=15) if schedule == "adaptive" else (
        Learned(hidden=16)
    )
    loss_fn = WeightedLoss(sched, w, "eps")
    net = _TinyEps()
    x = torch.randn(8, 3, 8, 8)
    gen = torch.Generator().manual_seed(0)
    calls = []
    if schedule == "adaptive":
        real_b, real_a = K.adaptive_bin_stats, K.adaptive_apply_stats
        K.adaptive_bin_stats = lambda *a: calls.append("b") or real_b(*a)
        K.adaptive_apply_stats = lambda *a: calls.append("a") or real_a(*a)
    try:
        with SyncRecorder() as rec:
            for _ in range(2):  # two steps: the second starts from an updated schedule
                out = loss_fn(net, x, generator=gen)
                out.loss.mean().backward()
                if schedule == "adaptive":
                    stats = sched.new_stats()
                    for half in (slice(0, 4), slice(4, 8)):  # two micro-batches
                        sched.add_stats(stats, out.logsnr[half], out.unweighted[half])
                    sched.apply_stats(stats)  # (the trainer all-reduces stats first)
                    sched.update(out.logsnr, out.unweighted)
    finally:
        if schedule == "adaptive":
            K.adaptive_bin_stats, K.adaptive_apply_stats = real_b, real_a
    assert rec.unexpected() == []
    if schedule == "adaptive":
        assert calls == (["b", "b", "a"] * 2 if kernels_mode == "kernels" else [])
        # the CPU-only NaN check of bin_stats ran only on the reference path
        guards = [e for e in rec.events if e[2] == "bin_stats"]
        assert (len(guards) > 0) == (kernels_mode == "reference")


@pytest.mark.parametrize("name", ["heun", "edm_stochastic", "euler"])
def test_sampling_loop_has_no_host_sync_beyond_the_finite_check(kernels_mode, name):
    """check_finite=False: nothing. check_finite=True on CPU: exactly one host read per step
    (the denoiser outputs are checked through the step's result) and one for the noise."""
    import vdmpp.samplers as S

    net = _TinyEps().eval()
    D = S.as_denoiser(net, "eps", "vp")
    sampler = getattr(S, name)
    kw = {"churn": 10.0} if name == "edm_stochastic" else {}
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    sigmas = S.karras_sigmas(6)  # built outside: _grid reads the σ grid once, before the loop
    g = torch.Generator().manual_seed(2)
    with SyncRecorder() as rec:
        sampler(D, noise, sigmas, generator=g, check_finite=False, **kw)
    assert rec.events == []
    with SyncRecorder() as rec:
        _, info = sampler(D, noise, sigmas, generator=g, check_finite=True, return_info=True, **kw)
    assert rec.unexpected() == []
    reads = [e for e in rec.events if e[0] == "aten::_local_scalar_dense"]
    assert len(reads) == info.steps + 1 and len(rec.events) == len(reads)


def test_cpu_only_guards_skip_accelerator_tensors():
    """The allow-listed guards never read a non-CPU tensor (meta stands in for a GPU here)."""
    from vdmpp.samplers._step import all_finite  # noqa: F401  (only called under a CPU check)
    from vdmpp.samplers.samplers import _checks_on
    from vdmpp.schedules import Adaptive
    from vdmpp.schedules.base import check_unit_interval

    t = torch.full((4,), 2.0, device="meta")  # outside [0, 1]: CPU would raise
    a = Adaptive(lambda lam: torch.ones_like(lam), bins=4).to("meta")
    a.force_reference = True
    with SyncRecorder() as rec:
        check_unit_interval(t)
        a.bin_stats(torch.full((3,), float("nan"), device="meta"), torch.ones(3, device="meta"))
    assert rec.events == []
    assert not _checks_on(t, True) and _checks_on(torch.ones(1), True)
