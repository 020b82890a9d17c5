"""Training throughput of vdmpp-train's step: images/s, fp32 vs bf16 autocast, eager vs compile.

    python bench/train.py [--device cpu|cuda] [--steps N] [--no-compile]
    python bench/train.py --schedule-update   # fused adaptive update pair vs the reference

One step = forward + backward of ``vdmpp.losses.WeightedLoss`` (sigmoid weighting, adaptive
schedule, ε-prediction) through ``Preconditioned(vdmpp.models.build(...))``, Adam step and
adaptive bin update — the inner loop of ``vdmpp.train.trainer``. Models: ``cifar32`` (61M,
3×32×32) and ``adm64`` (296M, 3×64×64) at their real size on a GPU; on a CPU the same
architectures narrowed (model_channels 16, one block per level) with small batches, so that the
numbers come in seconds. Writes bench/results/train-<device>.json.

``--schedule-update``: the trainer's step (2 micro-batches, ``Adaptive.add_stats`` each, then
``apply_stats``) with the fused ``vdmpp::adaptive_bin_stats`` / ``adaptive_apply_stats`` vs the
PyTorch reference (``force_reference``), same model, batch and noise; also the schedule update
alone. Writes bench/results/train-schedule-<device>.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from vdmpp.train import config as C
from vdmpp.train.objective import Objective, build_net

RESULTS = Path(__file__).parent / "results"

CASES = {
    "cuda": [
        ("cifar32", 32, 10, 128, {}),
        ("adm64", 64, 1000, 32, {}),
    ],
    "cpu": [
        ("cifar32", 32, 10, 8, {"model_channels": 16, "num_res_blocks": 1}),
        ("adm64", 64, 1000, 4, {"model_channels": 16, "num_res_blocks": 1}),
    ],
}


def _config(name: str, res: int, classes: int, overrides: dict) -> C.Config:
    return C.from_dict({
        "model": {"name": name, "overrides": overrides},
        "data": {"resolution": res, "channels": 3, "num_classes": classes,
                 "source": "unused/{0..0}.tar"},  # the benchmark feeds random tensors
        "objective": {"weighting": "sigmoid", "weighting_args": {"bias": 2.0}},
    }).validate()  # fmt: skip


def bench_case(name, res, classes, batch, overrides, device, precision, compiled, steps):
    cfg = _config(name, res, classes, overrides)
    torch.manual_seed(0)
    model = build_net(cfg).to(device)
    obj = Objective(cfg).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    fwd = torch.compile(model) if compiled else model
    x = torch.randn(batch, 3, res, res, device=device)
    y = torch.randint(0, classes, (batch,), device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    ctx = torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    if precision == "fp32":
        ctx = torch.autocast(torch.device(device).type, enabled=False)

    def step() -> None:
        with ctx:
            loss, lam, mse = obj(fwd, x, y, gen)
        loss.mean().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        obj.schedule.update(lam, mse)

    t0 = time.perf_counter()
    for _ in range(2):  # warm-up (and compilation)
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / steps
    params = sum(p.numel() for p in model.parameters())
    return {"model": name, "resolution": res, "batch": batch, "params": params,
            "precision": precision, "compile": compiled, "step_s": dt,
            "images_per_s": batch / dt, "warmup_s": warm}  # fmt: skip


def bench_schedule_update(name, res, classes, batch, overrides, device, steps, micro=2):
    """The trainer's step (``micro`` micro-batches: forward + backward + the adaptive statistics
    of each, then Adam and the schedule update) with the fused update pair vs the PyTorch
    reference, on the same model, batch and noise; plus the schedule update alone.

    The two modes run alternately, step by step, so that load from other processes hits both
    alike; rows report the minimum (least disturbed) and the median.
    """
    cfg = _config(name, res, classes, overrides)
    torch.manual_seed(0)
    model0 = build_net(cfg).to(device)
    x = torch.randn(batch, 3, res, res, device=device)
    y = torch.randint(0, classes, (batch,), device=device)
    modes = {m: _ScheduleMode(m, cfg, copy.deepcopy(model0), x, y, device, micro)
             for m in ("reference", "fused")}  # fmt: skip
    for _ in range(2):  # warm-up
        for m in modes.values():
            m.step()
    step_t: dict[str, list[float]] = {m: [] for m in modes}
    for _ in range(steps):
        for key, m in modes.items():
            t0 = time.perf_counter()
            m.step()
            _sync(device)
            step_t[key].append(time.perf_counter() - t0)
    emas = {key: m.sched.ema.clone() for key, m in modes.items()}
    upd_t: dict[str, list[float]] = {m: [] for m in modes}
    for _ in range(20):  # the update alone: 20 rounds of 50 updates, alternating
        for key, m in modes.items():
            t0 = time.perf_counter()
            for _ in range(50):
                m.update()
            _sync(device)
            upd_t[key].append((time.perf_counter() - t0) / 50)
    rows = []
    for key, m in modes.items():
        m.restore()
        mode = key if key == "reference" or m.calls else "fused (unavailable: reference ran)"
        rows.append({
            "model": name, "resolution": res, "batch": batch, "micro_batches": micro,
            "schedule_update": mode, "step_s": min(step_t[key]),
            "step_s_median": statistics.median(step_t[key]),
            "images_per_s": batch / min(step_t[key]), "update_us": min(upd_t[key]) * 1e6,
            "update_us_median": statistics.median(upd_t[key]) * 1e6,
            "ema_equal_across_modes": torch.equal(emas["reference"], emas["fused"]),
        })  # fmt: skip
    return rows


class _ScheduleMode:
    """One mode of bench_schedule_update: its model copy, objective, optimizer and RNG."""

    def __init__(self, mode, cfg, model, x, y, device, micro) -> None:
        import vdmpp.schedules._kernels as SK

        self.model, self.x, self.y, self.micro = model, x, y, micro
        self.obj = Objective(cfg).to(device)
        self.sched = self.obj.schedule
        self.sched.force_reference = mode == "reference"
        self.opt = torch.optim.Adam(model.parameters(), lr=1e-4)
        self.gen = torch.Generator(device=device).manual_seed(0)  # t and ε
        self.rng = torch.Generator().manual_seed(1)  # dropout: the global RNG, per mode
        self.calls: list[int] = []
        self.last: dict = {}
        self.K = SK.load_kernels()
        self.real = self.K.adaptive_bin_stats if self.K is not None else None
        if self.K is not None and mode == "fused":
            real = self.real
            self.K.adaptive_bin_stats = lambda *a: self.calls.append(1) or real(*a)

    def restore(self) -> None:
        if self.K is not None:
            self.K.adaptive_bin_stats = self.real

    def step(self) -> None:
        state = torch.get_rng_state()
        torch.set_rng_state(self.rng.get_state())
        n = self.x.shape[0] // self.micro
        stats = self.sched.new_stats()
        for k in range(self.micro):
            xs, ys = self.x[k * n:(k + 1) * n], self.y[k * n:(k + 1) * n]
            loss, lam, mse = self.obj(self.model, xs, ys, self.gen)
            (loss.mean() / self.micro).backward()
            self.sched.add_stats(stats, lam, mse)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.sched.apply_stats(stats)  # (the trainer all-reduces stats first)
        self.last.update(lam=lam.detach(), mse=mse.detach())
        self.rng.set_state(torch.get_rng_state())
        torch.set_rng_state(state)

    def update(self) -> None:
        """The schedule update alone, on the last micro-batch's λ and ‖ε − ε̂‖²."""
        stats = self.sched.new_stats()
        for _ in range(self.micro):
            self.sched.add_stats(stats, self.last["lam"], self.last["mse"])
        self.sched.apply_stats(stats)


def _sync(device) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = "cuda" if torch.cuda.is_available() else "cpu"
    ap.add_argument("--device", default=default, choices=["cpu", "cuda"])
    ap.add_argument("--steps", type=int, default=None, help="timed steps per case")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument(
        "--schedule-update", action="store_true",
        help="only: the step with the fused adaptive update pair vs the PyTorch reference "
        "(writes train-schedule-<device>.json)",
    )  # fmt: skip
    a = ap.parse_args()
    steps = a.steps or (20 if a.device == "cuda" else 3)
    if a.schedule_update:
        _main_schedule_update(a, steps)
        return
    rows = []
    for name, res, classes, batch, over in CASES[a.device]:
        for precision in ("fp32", "bf16"):
            for compiled in (False, True):
                if compiled and a.no_compile:
                    continue
                try:
                    r = bench_case(name, res, classes, batch, over, a.device, precision,
                                   compiled, steps)  # fmt: skip
                except Exception as e:  # e.g. no C++ compiler for inductor on this CPU
                    r = {"model": name, "precision": precision, "compile": compiled,
                         "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
                rows.append(r)
                ips = f"{r['images_per_s']:9.1f} img/s" if "images_per_s" in r else r["error"]
                print(f"{name:8s} {precision} compile={compiled!s:5s} {ips}", flush=True)
    out = {
        "device": a.device,
        "device_name": torch.cuda.get_device_name() if a.device == "cuda" else platform.processor()
        or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "note": "CPU rows use narrowed models (see CASES); the CPU was shared with other jobs",
        "results": rows,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"train-{a.device}.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path}")


def _main_schedule_update(a, steps: int) -> None:
    rows = []
    cases = CASES[a.device] if a.device == "cuda" else CASES[a.device][:1]  # CPU: cifar32 only
    for name, res, classes, batch, over in cases:
        for r in bench_schedule_update(name, res, classes, batch, over, a.device, steps):
            rows.append(r)
            print(f"{name:8s} {r['schedule_update']:9s} step {r['step_s'] * 1e3:9.2f} ms  "
                  f"update {r['update_us']:8.1f} us  same ema: {r['ema_equal_across_modes']}",
                  flush=True)  # fmt: skip
    out = {
        "bench": "train --schedule-update",
        "device": a.device,
        "device_name": torch.cuda.get_device_name() if a.device == "cuda" else platform.processor()
        or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "loadavg": [round(v, 2) for v in os.getloadavg()],
        "note": "fp32 eager; step = 2 micro-batches (forward, backward, add_stats each), clip, "
        "Adam, apply_stats; update_us = 2x add_stats + apply_stats alone on the last micro-batch; "
        "the same model, batch, noise and dropout for both modes, run alternately; min (and "
        "median) over the steps. CPU rows use narrowed models (CASES); the CPU was shared "
        "with other jobs",
        "results": rows,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"train-schedule-{a.device}.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
