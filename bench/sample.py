"""Benchmark ``vdmpp-eval sample``'s inner loop: images/s for Heun, 18 steps (35 NFE).

Models (random weights; speed does not depend on them): ``cifar32`` at 32×32 and ``adm64`` at
64×64 on a GPU; on a CPU the ``tiny`` config at 8×8 and a narrowed cifar32 at 32×32 (the full
models take minutes per batch there). Variants: fp32 vs bf16 autocast, with and without the
fused ``vdmpp.kernels`` Heun step (when importable), and with the network under
``torch.compile`` (GPU only unless ``--compile``). Writes bench/results/sample-<device>.json.

    python bench/sample.py                  # CPU, tiny sizes
    python bench/sample.py --device cuda    # GPU: cifar32 (batch 256), adm64 (batch 64)
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from vdmpp.eval.model import denoiser_for
from vdmpp.samplers import PerSampleGenerator, heun, karras_sigmas

CASES = {
    "cuda": [("cifar32", {}, 32, 3, 256), ("adm64", {}, 64, 3, 64)],
    "cpu": [
        ("tiny", {"in_channels": 1, "resolution": 8}, 8, 1, 64),
        ("cifar32", {"model_channels": 32, "num_res_blocks": 1, "dropout": 0.0}, 32, 3, 8),
    ],
}


def _model(name: str, overrides: dict, device: torch.device):
    from vdmpp.models import Preconditioned, build

    torch.manual_seed(0)
    net = build(name, **overrides)
    return Preconditioned(net, "edm", sigma_data=0.5).to(device).eval().requires_grad_(False)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_case(model, meta, batch: int, device, *, bf16: bool, kernels: bool, repeats: int):
    den = denoiser_for(model, meta)
    sigmas = karras_sigmas(18)
    shape = (meta["channels"], meta["resolution"], meta["resolution"])
    labels = torch.arange(batch, device=device) % (meta["num_classes"] or 1)
    extra = {"class_labels": labels} if meta["num_classes"] else {}

    def once():
        gen = PerSampleGenerator(range(batch), device)
        noise = gen.randn(shape)
        with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
            return heun(den, noise, sigmas, extra_args=extra, use_kernels=kernels,
                        return_info=True)

    _, info = once()  # warm-up (and compilation)
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        once()
        _sync(device)
        times.append(time.perf_counter() - t0)
    best = min(times)
    return {"images_per_s": batch / best, "seconds_per_batch": best, "nfe": info.nfe,
            "kernels": info.kernels}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--compile", action="store_true", help="also torch.compile on a CPU")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    device = torch.device(a.device)
    try:
        import vdmpp.kernels as K  # noqa: F401

        have_kernels = True
    except Exception:
        have_kernels = False
    rows = []
    for name, over, res, ch, batch in CASES[device.type]:
        model = _model(name, over, device)
        meta = {"resolution": res, "channels": ch, "process": "vp", "parameterization": "edm",
                "num_classes": getattr(model.net, "num_classes", None)}
        variants = [(False, False, False), (True, False, False)]
        if have_kernels:
            variants += [(False, True, False), (True, True, False)]
        if device.type == "cuda" or a.compile:
            variants += [(False, False, True), (True, False, True)]
        for bf16, kernels, compiled in variants:
            m = torch.compile(model) if compiled else model
            if compiled:
                m.denoise = torch.compile(model.denoise)
            try:
                r = run_case(m, meta, batch, device, bf16=bf16, kernels=kernels,
                             repeats=a.repeats)
            except Exception as e:  # record, keep going
                r = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
            row = {"model": name, "overrides": over, "resolution": res, "batch": batch,
                   "precision": "bf16" if bf16 else "fp32", "fused_kernels": kernels,
                   "compile": compiled, **r}
            rows.append(row)
            ips = r.get("images_per_s")
            print(f"{name:8s} {res:3d}px b={batch:<4d} {row['precision']} kernels={kernels!s:5s} "
                  f"compile={compiled!s:5s} " + (f"{ips:9.2f} img/s" if ips else r["error"]),
                  flush=True)
    info = {
        "benchmark": "vdmpp-eval sample: heun, 18 steps (35 NFE)",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else
        platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "kernels_importable": have_kernels,
        "results": rows,
    }
    out = Path(a.out or Path(__file__).parent / "results" / f"sample-{device.type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(info, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
