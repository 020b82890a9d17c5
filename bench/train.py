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
import platform
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
    reference, on the same model, batch and noise; plus the schedule update alone."""
    cfg = _config(name, res, classes, overrides)
    torch.manual_seed(0)
    model0 = build_net(cfg).to(device)
    x = torch.randn(batch, 3, res, res, device=device)
    y = torch.randint(0, classes, (batch,), device=device)
    rows = []
    for mode in ("reference", "fused"):
        row = _schedule_mode(mode, cfg, copy.deepcopy(model0), x, y, device, steps, micro)
        rows.append({"model": name, "resolution": res, "batch": batch, **row})
    same = torch.equal(rows[0].pop("ema"), rows[1].pop("ema"))
    for r in rows:
        r["ema_equal_across_modes"] = same
    return rows


def _schedule_mode(mode, cfg, model, x, y, device, steps, micro):
    import vdmpp.schedules._kernels as SK

    K = SK.load_kernels()
    obj = Objective(cfg).to(device)
    sched = obj.schedule
    sched.force_reference = mode == "reference"
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    gen = torch.Generator(device=device).manual_seed(0)
    n = x.shape[0] // micro
    calls = []
    last = {}

    def step() -> None:
        stats = sched.new_stats()
        for k in range(micro):
            loss, lam, mse = obj(model, x[k * n:(k + 1) * n], y[k * n:(k + 1) * n], gen)
            (loss.mean() / micro).backward()
            sched.add_stats(stats, lam, mse)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.apply_stats(stats)  # (the trainer all-reduces stats first)
        last.update(lam=lam.detach(), mse=mse.detach())

    def update() -> None:  # the schedule update alone, on the last micro-batch's λ, ‖ε − ε̂‖²
        stats = sched.new_stats()
        for _ in range(micro):
            sched.add_stats(stats, last["lam"], last["mse"])
        sched.apply_stats(stats)

    real = K.adaptive_bin_stats if K is not None else None
    if K is not None:
        K.adaptive_bin_stats = lambda *a: calls.append(1) or real(*a)
    try:
        for _ in range(2):
            step()
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        _sync(device)
        dt = (time.perf_counter() - t0) / steps
        ema = sched.ema.clone()
        for _ in range(20):
            update()
        _sync(device)
        reps = 500
        t0 = time.perf_counter()
        for _ in range(reps):
            update()
        _sync(device)
        upd = (time.perf_counter() - t0) / reps
    finally:
        if K is not None:
            K.adaptive_bin_stats = real
    if mode == "fused" and not calls:
        mode = "fused (unavailable: reference ran)"
    return {"micro_batches": micro, "schedule_update": mode, "step_s": dt,
            "images_per_s": x.shape[0] / dt, "update_us": upd * 1e6, "ema": ema}  # fmt: skip


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
    for name, res, classes, batch, over in CASES[a.device]:
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
        "note": "fp32 eager; step = 2 micro-batches (forward, backward, add_stats each), clip, "
        "Adam, apply_stats; update_us = 2x add_stats + apply_stats alone on the last micro-batch; "
        "the same model, batch and noise for both modes. CPU rows use narrowed models (CASES); "
        "the CPU was shared with other jobs",
        "results": rows,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"train-schedule-{a.device}.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
