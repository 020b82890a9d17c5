"""Training throughput of vdmpp-train's step: images/s, fp32 vs bf16 autocast, eager vs compile.

    python bench/train.py [--device cpu|cuda] [--steps N] [--no-compile]

One step = forward + backward of ``vdmpp.losses.WeightedLoss`` (sigmoid weighting, adaptive
schedule, ε-prediction) through ``Preconditioned(vdmpp.models.build(...))``, Adam step and
adaptive bin update — the inner loop of ``vdmpp.train.trainer``. Models: ``cifar32`` (61M,
3×32×32) and ``adm64`` (296M, 3×64×64) at their real size on a GPU; on a CPU the same
architectures narrowed (model_channels 16, one block per level) with small batches, so that the
numbers come in seconds. Writes bench/results/train-<device>.json.
"""

from __future__ import annotations

import argparse
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
        "data": {"resolution": res, "channels": 3, "num_classes": classes},
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = "cuda" if torch.cuda.is_available() else "cpu"
    ap.add_argument("--device", default=default, choices=["cpu", "cuda"])
    ap.add_argument("--steps", type=int, default=None, help="timed steps per case")
    ap.add_argument("--no-compile", action="store_true")
    a = ap.parse_args()
    steps = a.steps or (20 if a.device == "cuda" else 3)
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


if __name__ == "__main__":
    main()
