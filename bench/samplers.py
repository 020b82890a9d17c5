"""Benchmark vdmpp.samplers: one Heun step's elementwise work, and a full 18-step Heun sample.

Times, for float32 and bfloat16:
  * step: the elementwise part of one EDM stochastic step (churn, Euler step, 2nd-order
    correction; everything but the network) — reference eager, reference under torch.compile,
    and the fused ``vdmpp.kernels`` ops when importable;
  * sample: ``heun`` with 18 steps (35 NFE) and a cheap VP ε-network through ``as_denoiser`` —
    eager, and the whole sampling call under torch.compile;
  * overhead: the sampler's own time per Heun step (``heun`` time / steps) with a trivial
    denoiser D(x; σ) = x/(1 + σ²), ``check_finite`` off and on, reference and kernels — the cost
    of the per-evaluation NaN/inf check (target: on within 1.2× of off on CPU).
Prints a table and writes bench/results/samplers-<device>.json.

    python bench/samplers.py                       # CPU: 8x3x64x64
    python bench/samplers.py --device cuda         # GPU: 64x3x512x512
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from vdmpp.samplers import as_denoiser, heun, karras_sigmas
from vdmpp.samplers._step import churn, heun_step

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class CheapEps(nn.Module):
    """A two-conv ε-network conditioned on λ by a scale: cheap next to the sampler's own work."""

    def __init__(self, ch: int = 3, hidden: int = 8) -> None:
        super().__init__()
        self.inp = nn.Conv2d(ch, hidden, 3, padding=1)
        self.out = nn.Conv2d(hidden, ch, 3, padding=1)

    def forward(self, z, logsnr, class_labels=None):
        h = torch.nn.functional.silu(self.inp(z))
        return self.out(h) * torch.sigmoid(logsnr).to(z.dtype).view(-1, 1, 1, 1)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, device, warmup: int, repeats: int) -> float:
    """Median wall time of fn() in milliseconds."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _step_ref(x, noise, d1, d2, t, t_hat, t_next):
    x_hat = churn(x, noise, t, t_hat, 1.003)
    x_e = heun_step(x_hat, d1, None, t_hat, t_next)  # the Euler point (D₂ is evaluated there)
    return x_e, heun_step(x_hat, d1, d2, t_hat, t_next)  # both returned: nothing is dead code


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _record(rows, what, dtype, mode, ms, nbytes=None):
    row = {"what": what, "dtype": dtype, "mode": mode, "ms": round(ms, 4)}
    if nbytes:
        row["GB/s"] = round(nbytes / ms / 1e6, 2)
    rows.append(row)
    bw = f"{row['GB/s']:>9.2f}" if nbytes else ""
    print(f"{what:<8} {dtype:<9} {mode:<18} {ms:>11.3f} ms {bw}", flush=True)


def _bench_dtype(name, shape, sigmas, device, K, args, rows) -> None:
    dtype = DTYPES[name]
    g = torch.Generator(device=device).manual_seed(0)
    x, noise, d1, d2 = (torch.randn(shape, generator=g, device=device).to(dtype) for _ in range(4))
    # churn reads 2, writes 1; Euler reads 2, writes 1; correction reads 3, writes 1
    nbytes = 10 * x.numel() * x.element_size()
    t, t_hat, t_next = 10.0, 11.0, 8.0
    reps = (args.warmup, args.repeats)

    def step(f=_step_ref):
        return f(x, noise, d1, d2, t, t_hat, t_next)

    _record(rows, "step", name, "reference eager", _time(step, device, *reps), nbytes)
    if not args.no_compile:
        compiled = torch.compile(_step_ref, fullgraph=True)
        ms = _time(lambda: step(compiled), device, *reps)
        _record(rows, "step", name, "reference compile", ms, nbytes)
    kernels = K is not None and K.can_use("heun_step", x)
    if kernels:

        def fused():
            x_hat = K.churn(x, noise, t, t_hat, 1.003)
            x_e = K.heun_step(x_hat, d1, None, t_hat, t_next)
            return x_e, K.heun_step(x_hat, d1, d2, t_hat, t_next)

        _record(rows, "step", name, "vdmpp.kernels", _time(fused, device, *reps), nbytes)

    net = CheapEps().to(device, dtype).eval()
    sreps = (1, max(2, args.repeats // 2))

    def sample(network=net, use_kernels=False):
        D = as_denoiser(network, "eps", "vp")
        return heun(D, x, sigmas, check_finite=False, use_kernels=use_kernels)

    _record(rows, "sample", name, "eager", _time(sample, device, *sreps))
    if kernels:
        ms = _time(lambda: sample(use_kernels=True), device, *sreps)
        _record(rows, "sample", name, "eager+kernels", ms)
    if not args.no_compile:
        cnet = torch.compile(net)
        _record(
            rows, "sample", name, "compile network", _time(lambda: sample(cnet), device, *sreps)
        )
    if args.compile_whole and not args.no_compile:
        whole = torch.compile(sample)
        t0 = time.perf_counter()
        whole()
        _sync(device)
        print(f"  (compiling the whole sample took {time.perf_counter() - t0:.1f} s)")
        _record(rows, "sample", name, "compile whole", _time(whole, device, *sreps))


def _trivial_denoiser(x, sigma):
    """D(x; σ) = x / (1 + σ²) per sample: one elementwise pass, the cheapest honest denoiser."""
    return x * (1.0 / (1.0 + sigma * sigma)).to(x.dtype).view(-1, *([1] * (x.dim() - 1)))


def _bench_overhead(name, shape, sigmas, device, K, args, rows) -> None:
    """Sampler overhead per Heun step against a trivial denoiser: check_finite on vs off.

    The two settings run alternately (off, on, off, on, ...) so that load from other processes
    hits both alike; each row reports the minimum (the least disturbed run) and the median.
    """
    dtype = DTYPES[name]
    x = torch.randn(shape, generator=torch.Generator(device=device).manual_seed(1),
                    device=device).to(dtype)  # fmt: skip
    steps = len(sigmas) - 1
    nfe = 2 * steps - 1
    s = torch.tensor([1.0] * shape[0], device=device)
    den = _time(lambda: _trivial_denoiser(x, s), device, 1, args.repeats) * nfe / steps
    _record(rows, "overhead", name, "denoiser alone", den)  # per step: its NFE share
    modes = [False] + ([True] if K is not None and K.can_use("heun_step", x) else [])
    for kernels in modes:
        times: dict[bool, list[float]] = {False: [], True: []}
        for rep in range(1 + args.repeats):
            for check in (False, True):
                t0 = time.perf_counter()
                heun(_trivial_denoiser, x, sigmas, check_finite=check, use_kernels=kernels)
                _sync(device)
                if rep:  # the first round warms up
                    times[check].append((time.perf_counter() - t0) * 1e3 / steps)
        for check in (False, True):
            mode = f"{'kernels' if kernels else 'reference'} check={'on' if check else 'off'}"
            _record(rows, "overhead", name, mode, min(times[check]))
            rows[-1].update({
                "per": "step", "check_finite": check, "kernels": kernels,
                "median_ms": round(statistics.median(times[check]), 4),
            })  # fmt: skip
        off, on = rows[-2]["ms"], rows[-1]["ms"]
        rows[-1]["check_on_over_off"] = round(on / off, 3)
        print(f"  check on / off = {on / off:.3f} (min), "
              f"{rows[-1]['median_ms'] / rows[-2]['median_ms']:.3f} (median)", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=None, help="default 8 on CPU, 64 on GPU")
    p.add_argument("--res", type=int, default=None, help="default 64 on CPU, 512 on GPU")
    p.add_argument("--steps", type=int, default=18)
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    p.add_argument(
        "--compile-whole", action="store_true",
        help="also compile the whole sampling call (slow to compile on CPU)",
    )  # fmt: skip
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument(
        "--overhead-res", type=int, default=None,
        help="resolution of the per-step overhead rows (default 256 on CPU, 512 on GPU)",
    )  # fmt: skip
    p.add_argument("--overhead-only", action="store_true", help="only the overhead rows")
    p.add_argument(
        "--out", default=None, help="JSON path (default bench/results/samplers-<dev>.json)"
    )
    args = p.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    batch = args.batch or (64 if gpu else 8)
    res = args.res or (512 if gpu else 64)
    shape = (batch, 3, res, res)
    try:
        import vdmpp.kernels as K
    except Exception as e:  # any failure means "no kernels"
        K, kernels_status = None, f"unavailable ({type(e).__name__})"
    else:
        kernels_status = "importable"

    sigmas = karras_sigmas(args.steps)
    rows: list[dict] = []
    print(f"vdmpp.samplers bench on {_device_name(device)} ({device}), torch {torch.__version__}")
    print(f"shape {shape}, {args.steps} Heun steps, {torch.get_num_threads()} threads, "
          f"kernels {kernels_status}")  # fmt: skip
    print(f"{'what':<8} {'dtype':<9} {'mode':<18} {'time':>14} {'GB/s':>9}")
    for name in args.dtypes.split(","):
        if not args.overhead_only:
            _bench_dtype(name, shape, sigmas, device, K, args, rows)
        ores = args.overhead_res or (512 if gpu else 256)
        _bench_overhead(name, (batch, 3, ores, ores), sigmas, device, K, args, rows)

    out = Path(args.out or Path(__file__).parent / "results" / f"samplers-{device.type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    record_json = {
        "bench": "samplers",
        "device": str(device),
        "device_name": _device_name(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "shape": list(shape),
        "steps": args.steps,
        "nfe": 2 * args.steps - 1,
        "kernels": kernels_status,
        "network": "CheapEps (2 convs, 8 hidden channels) via as_denoiser(eps, vp)",
        "overhead_denoiser": "x / (1 + sigma^2) per sample (one elementwise pass)",
        "overhead_shape": [batch, 3, *[args.overhead_res or (512 if gpu else 256)] * 2],
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "loadavg": [round(v, 2) for v in os.getloadavg()],  # busy machine: see ratios
        "results": rows,
    }
    out.write_text(json.dumps(record_json, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
