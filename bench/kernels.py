"""Benchmark of the vdmpp-kernels fused ops against eager PyTorch and torch.compile.

    python bench/kernels.py [--device cpu|cuda] [--reps N] [--threads N] [--quick]

heun_step (2nd-order correction and Euler step; 8×3×256×256 on CPU, 64×3×512×512 on GPU),
float32 and bfloat16: fused vs eager (the samplers' reference formula) vs torch.compile of that
formula; time, effective GB/s (bytes the step must move ÷ time) and % of the measured copy
bandwidth. adaptive_ema_update at batch 256 and 4096 (100 bins): fused vs the eager reference
(Adaptive.bin_stats + apply_stats's ops); on a GPU also the number of kernel launches per call
and whether the call captures in a CUDA graph. Prints a table and writes
bench/results/kernels-<device>.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch

import vdmpp.kernels as K
from vdmpp.kernels import reference as R

RESULTS = Path(__file__).parent / "results"


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _inner(fn: Callable[[], object], device: str, target: float) -> int:
    """Calls per timed batch so that one batch takes about `target` seconds."""
    for _ in range(3):  # warm-up
        fn()
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return max(1, int(target / max(time.perf_counter() - t0, 1e-7)))


def bench_all(
    impls: dict[str, Callable[[], object]], device: str, reps: int, target: float = 0.01
) -> dict[str, float]:
    """Seconds per call of each implementation: the fastest of `reps` timed batches, the
    implementations interleaved round-robin (the CPU here is shared with other jobs, so the
    minimum over interleaved batches is the least disturbed, least biased estimate)."""
    inner = {name: _inner(fn, device, target) for name, fn in impls.items()}
    best = dict.fromkeys(impls, float("inf"))
    for _ in range(reps):
        for name, fn in impls.items():
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(inner[name]):
                fn()
            _sync(device)
            best[name] = min(best[name], (time.perf_counter() - t0) / inner[name])
    return best


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
        else:
            name = platform.processor() or "cpu"
    except OSError:
        name = platform.processor() or "cpu"
    return f"{name} ({torch.get_num_threads()} threads)"


def copy_bandwidth(numel: int, device: str, reps: int) -> float:
    """GB/s of a plain float32 tensor copy (read + write) of `numel` elements."""
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    t = bench_all({"copy": lambda: dst.copy_(src)}, device, reps)["copy"]
    return 2 * src.nbytes / t / 1e9


def count_launches(fn: Callable[[], object]) -> int | None:
    """CUDA kernels launched by one call (torch.profiler), None without CUDA."""
    if not torch.cuda.is_available():
        return None
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def graph_capturable(fn: Callable[[], object]) -> bool | str:
    """Whether fn captures in a CUDA graph (and replays); the error text if not."""
    try:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            fn()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        g.replay()
        torch.cuda.synchronize()
        return True
    except Exception as e:  # report, don't fail the benchmark
        torch.cuda.synchronize()
        return f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"


def bench_heun(device: str, shape: tuple[int, ...], reps: int, copy_gbs: float) -> list[dict]:
    rows = []
    t_hat, t_next = 1.7, 1.2
    compiled = torch.compile(R.heun_step, dynamic=False)
    for dtype in (torch.float32, torch.bfloat16):
        g = torch.Generator().manual_seed(0)
        x, d1, d2 = (torch.randn(shape, generator=g).to(device, dtype) for _ in range(3))
        for step, nxt in (("correction", d2), ("euler", None)):
            n_io = 4 if nxt is not None else 3  # operands read + the output written
            nbytes = n_io * x.numel() * x.element_size()
            impls = {
                "fused": lambda x=x, d1=d1, nxt=nxt: K.heun_step(x, d1, nxt, t_hat, t_next),
                "eager": lambda x=x, d1=d1, nxt=nxt: R.heun_step(x, d1, nxt, t_hat, t_next),
                "compile": lambda x=x, d1=d1, nxt=nxt: compiled(x, d1, nxt, t_hat, t_next),
            }
            ref = impls["eager"]()
            times = bench_all(impls, device, reps)
            for name, fn in impls.items():
                diff = (fn().float() - ref.float()).abs().max().item()
                rows.append(
                    {
                        "op": "heun_step",
                        "step": step,
                        "dtype": str(dtype).removeprefix("torch."),
                        "shape": list(shape),
                        "impl": name,
                        "time_us": times[name] * 1e6,
                        "gb_s": nbytes / times[name] / 1e9,
                        "pct_copy_bw": 100 * nbytes / times[name] / 1e9 / copy_gbs,
                        "max_abs_diff_vs_eager": diff,
                        "launches": count_launches(fn) if device == "cuda" else None,
                    }
                )
            for r in rows[-3:]:
                r["speedup_vs_eager"] = times["eager"] / (r["time_us"] / 1e6)
            rows[-3]["time_vs_compile"] = times["fused"] / times["compile"]  # <= 1: fused wins
    return rows


def bench_adaptive(device: str, reps: int) -> list[dict]:
    rows = []
    bins = 100
    for batch in (256, 4096):
        g = torch.Generator().manual_seed(batch)
        lam = (torch.randn(batch, generator=g) * 8).to(device)
        value = torch.rand(batch, generator=g).to(device)
        state = {n: (torch.ones(bins, device=device), torch.zeros(bins + 1, device=device))
                 for n in ("fused", "eager")}  # fmt: skip
        args = (lam, value, 0.999, -20.0, 20.0)
        impls = {
            "fused": lambda st=state["fused"], a=args: K.adaptive_ema_update(*st, *a),
            "eager": lambda st=state["eager"], a=args: R.adaptive_ema_update(*st, *a),
        }
        times = bench_all(impls, device, reps)
        for name, fn in impls.items():
            row = {
                "op": "adaptive_ema_update",
                "batch": batch,
                "bins": bins,
                "impl": name,
                "time_us": times[name] * 1e6,
                "speedup_vs_eager": times["eager"] / times[name],
                "launches": None,
                "cuda_graph": None,
            }
            if device == "cuda":
                row["launches"] = count_launches(fn)
                row["cuda_graph"] = graph_capturable(fn)
            rows.append(row)
        # Agreement from one call each on the same fresh state (the timed states above have
        # seen different numbers of calls, so comparing them would measure nothing).
        fresh = {n: (torch.ones(bins, device=device), torch.zeros(bins + 1, device=device))
                 for n in ("fused", "eager")}  # fmt: skip
        K.adaptive_ema_update(*fresh["fused"], *args)
        R.adaptive_ema_update(*fresh["eager"], *args)
        (e_f, c_f), (e_r, c_r) = fresh["fused"], fresh["eager"]
        rows[-1]["max_abs_diff_fused_vs_eager"] = max(
            (e_f - e_r).abs().max().item(), (c_f - c_r).abs().max().item()
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    has_gpu = torch.cuda.is_available() and K.has_kernel("heun_step", "cuda")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if has_gpu else "cpu")
    ap.add_argument("--reps", type=int, default=25)
    ap.add_argument("--quick", action="store_true", help="small shapes (smoke test)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (1 on an oversubscribed box)"
    )
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not K.available():
        raise SystemExit(f"vdmpp.kernels extension not loaded: {K.load_error}")
    device = args.device
    if not K.has_kernel("heun_step", device):
        raise SystemExit(f"no vdmpp kernels registered for {device}")
    shape = (64, 3, 512, 512) if device == "cuda" else (8, 3, 256, 256)
    if args.quick:
        shape = (2, 3, 64, 64)
    numel = 1
    for s in shape:
        numel *= s
    copy_gbs = copy_bandwidth(numel * 2, device, args.reps)  # ~the bytes a heun call moves
    heun = bench_heun(device, shape, args.reps, copy_gbs)
    adaptive = bench_adaptive(device, args.reps)
    result = {
        "device": device_name(device),
        "device_type": device,
        "torch": torch.__version__,
        "vdmpp_kernels": K.__version__,
        "threads": torch.get_num_threads(),
        "copy_bandwidth_gb_s": copy_gbs,
        "heun_step": heun,
        "adaptive_ema_update": adaptive,
    }

    print(f"device: {result['device']}   torch {torch.__version__}")
    print(f"measured copy bandwidth: {copy_gbs:.1f} GB/s\n")
    print(f"{'heun_step':<12}{'dtype':<10}{'impl':<9}{'time µs':>11}{'GB/s':>9}"
          f"{'% copy':>8}{'× eager':>9}{'launches':>10}")  # fmt: skip
    for r in heun:
        print(
            f"{r['step']:<12}{r['dtype']:<10}{r['impl']:<9}{r['time_us']:>11.1f}"
            f"{r['gb_s']:>9.1f}{r['pct_copy_bw']:>7.0f}%{r['speedup_vs_eager']:>9.2f}"
            f"{r['launches'] if r['launches'] is not None else '-':>10}"
        )
    print("\nfused / torch.compile time (same run; <= 1.0: the fused op is at least as fast):")
    for r in heun:
        if "time_vs_compile" in r:
            print(f"  {r['step']:<12}{r['dtype']:<10}{r['time_vs_compile']:.3f}")
    print(f"\n{'adaptive':<12}{'batch':>6}  {'impl':<9}{'time µs':>11}{'× eager':>9}"
          f"{'launches':>10}  cuda graph")  # fmt: skip
    for r in adaptive:
        print(
            f"{'':<12}{r['batch']:>6}  {r['impl']:<9}{r['time_us']:>11.1f}"
            f"{r['speedup_vs_eager']:>9.2f}"
            f"{r['launches'] if r['launches'] is not None else '-':>10}  "
            f"{r['cuda_graph'] if r['cuda_graph'] is not None else '-'}"
        )
    out = args.out or RESULTS / f"kernels-{device}.json"
    if not args.quick or args.out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
