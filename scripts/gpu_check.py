"""The first-GPU check of vdmpp (called by scripts/gpu_check.sh): build, smoke, tests, exactness,
graphs, benchmarks, training — in priority order, each phase under its own timeout and within one
overall budget (default 480 s), each writing its log and a JSON record as it goes, so a run cut
off anywhere still reports what it did.

    python scripts/gpu_check.py [--out DIR] [--budget SECONDS] [--only a,b] [--cpu-dry-run]

Outputs (DIR defaults to $OUT, else gpu_check_out/): ``summary.json`` (every phase so far),
``phases/NN-<phase>.log`` + ``.json``, ``ptxas.txt`` (the build's register/spill lines), the
benchmark records ``*-cuda.json``, and ``gpu_check.tar.gz`` holding all of it, refreshed after
every phase (the device tool returns at most 8 files).

``--cpu-dry-run`` runs every phase's CPU-side logic with no GPU: argument handling, timeouts,
JSON and log writing, the "hang" report (with a planted op that sleeps), and the exactness /
graph / sync workers on CPU tensors at small sizes; commands that need the GPU (the CUDA build,
pytest, the benchmarks, training) are replaced by a stand-in that prints what would run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HANG_PLANT_ENV = "VDMPP_GPU_CHECK_PLANT_HANG"  # smoke worker: add an op that never returns
LIBS = ["schedules", "losses", "samplers", "models"]

# (phase, timeout in seconds), in priority order. The sum exceeds the budget on purpose: the
# late phases get what is left and are skipped, with a record saying so, when nothing is.
PHASES = [
    ("build", 170),
    ("smoke", 60),
    ("tests", 120),
    ("exactness", 60),
    ("graphs", 45),
    ("bench", 90),
    ("train", 90),
]


# --- workers (run in a subprocess: `gpu_check.py --worker NAME --device DEV`) ----------------
def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def worker_smoke(device: str, small: bool) -> dict:
    """One call of every op; START/OK lines flushed so the parent can name a hanging op. With
    VDMPP_GPU_CHECK_PLANT_HANG=1 (the dry run's second call) only an op that sleeps forever."""
    if os.environ.get(HANG_PLANT_ENV) == "1":
        print("START _planted_sleep", flush=True)
        time.sleep(3600)
    import torch

    import vdmpp.kernels as K

    g = torch.Generator().manual_seed(0)
    x, d1, d2 = (torch.randn(2, 3, 8, 8, generator=g).to(device) for _ in range(3))
    lam, val = torch.randn(64, generator=g).to(device) * 8, torch.rand(64, generator=g).to(device)
    ema, cdf, stats = (
        torch.ones(16, device=device),
        torch.zeros(17, device=device),
        torch.zeros(2, 16, device=device),
    )
    calls = {
        "kernel_image_ok": lambda: torch.ops.vdmpp.kernel_image_ok(torch.empty(0, device=device)),
        "heun_step": lambda: K.heun_step(x, d1, d2, 2.0, 1.5),
        "heun_step_euler": lambda: K.heun_step(x, d1, None, 2.0, 1.5),
        "churn": lambda: K.churn(x, d1, 1.0, 1.2, 1.0),
        "adaptive_ema_update": lambda: K.adaptive_ema_update(ema, cdf, lam, val, 0.9, -20, 20),
        "adaptive_bin_stats": lambda: K.adaptive_bin_stats(stats, lam, val, -20, 20),
        "adaptive_apply_stats": lambda: K.adaptive_apply_stats(ema, cdf, stats, 0.9),
    }
    done = []
    for name, fn in calls.items():
        print(f"START {name}", flush=True)
        fn()
        _sync(device)
        print(f"OK {name}", flush=True)
        done.append(name)
    return {"ops": done}


def _heun_args(shape, dtype, device, layout, seed=0):
    """Three operands of `shape`: contiguous, channels_last, or a contiguous view 3 elements
    into its storage on the device (scalar head, then the 16-byte-aligned vector body)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    n = 1
    for s in shape:
        n *= s
    ts = []
    for _ in range(3):
        flat = torch.randn(n + 3, generator=g).mul(5).to(dtype).to(device)
        if layout == "offset":
            ts.append(flat[3:].view(shape))
        elif layout == "channels_last":
            ts.append(flat[:n].view(shape).contiguous(memory_format=torch.channels_last))
        else:
            ts.append(flat[:n].view(shape))
    return ts


def worker_exactness(device: str, small: bool) -> dict:
    """heun_step / churn on the device bit-equal to the CPU kernel (itself bit-equal to the
    PyTorch reference: csrc/tests), fp32/bf16 × contiguous/channels_last/offset views, and one
    tensor of more than 2^31 elements (checked at both ends)."""
    import torch

    import vdmpp.kernels as K

    shape = (2, 3, 16, 16) if small else (64, 3, 512, 512)
    out = {"shape": list(shape), "cases": []}
    bad = 0
    for dtype in (torch.float32, torch.bfloat16):
        for layout in ("contiguous", "channels_last", "offset"):
            x, d1, d2 = _heun_args(shape, dtype, device, layout)
            xc, d1c, d2c = (t.cpu() for t in (x, d1, d2))
            res = {}
            for step, nxt, nxt_c in (("correction", d2, d2c), ("euler", None, None)):
                got = K.heun_step(x, d1, nxt, 80.0, 57.58).cpu()
                res[step] = bool(torch.equal(got, K.heun_step(xc, d1c, nxt_c, 80.0, 57.58)))
            got = K.churn(x, d1, 1.0, 1.25, 1.007).cpu()
            res["churn"] = bool(torch.equal(got, K.churn(xc, d1c, 1.0, 1.25, 1.007)))
            bad += sum(not v for v in res.values())
            out["cases"].append({"dtype": str(dtype).removeprefix("torch."), "layout": layout,
                                 **res})  # fmt: skip
            del x, d1, d2
    n = (1 << 16) + 17 if small else (1 << 31) + 17  # bf16: 4 GiB per operand on a GPU
    g = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(n, generator=g, device=device, dtype=torch.bfloat16)
    d1 = torch.randn(n, generator=g, device=device, dtype=torch.bfloat16)
    y = K.heun_step(x, d1, None, 2.0, 1.0)
    ends = []
    for sl in (slice(0, 1 << 20), slice(n - (1 << 20) - 5, n)):
        ends.append(bool(torch.equal(y[sl].cpu(), K.heun_step(x[sl].cpu(), d1[sl].cpu(), None,
                                                              2.0, 1.0))))  # fmt: skip
    out["big"] = {"numel": n, "over_2_31": n > 2**31, "ends_equal": ends}
    bad += sum(not e for e in ends)
    out["mismatches"] = bad
    if bad:
        raise SystemExit(f"exactness: {bad} mismatching case(s): {json.dumps(out)}")
    return out


def _train_step(device: str) -> None:
    """A WeightedLoss step with the adaptive schedule as vdmpp-train runs it."""
    import torch
    from torch import nn

    from vdmpp.losses import WeightedLoss, weightings
    from vdmpp.schedules import Adaptive

    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 8, 3, padding=1)
            self.b = nn.Conv2d(8, 3, 3, padding=1)

        def forward(self, z, logsnr, class_labels=None):
            s = torch.sigmoid(logsnr).view(-1, 1, 1, 1).to(z.dtype)
            return self.b(torch.nn.functional.silu(self.a(z))) * s

    w = weightings.get("sigmoid", bias=2.0)
    sched = Adaptive(w, bins=100, logsnr_min=-15, logsnr_max=15).to(device)
    loss_fn = WeightedLoss(sched, w, "eps")
    net = Tiny().to(device)
    x = torch.randn(8, 3, 8, 8, device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    out = loss_fn(net, x, generator=gen)
    out.loss.mean().backward()
    stats = sched.new_stats()
    sched.add_stats(stats, out.logsnr, out.unweighted)
    sched.apply_stats(stats)


def _sample(device: str) -> None:
    import torch

    import vdmpp.samplers as S

    D = lambda x, sigma: x / (1 + sigma.view(-1, 1, 1, 1) ** 2)
    noise = torch.randn(2, 3, 8, 8, device=device)
    sigmas = S.karras_sigmas(6).to(device)
    S.heun(D, noise, sigmas, check_finite=False)


def worker_graphs(device: str, small: bool) -> dict:
    """CUDA-graph capture + replay (Heun step, the adaptive pair) equal to eager bitwise; a side
    stream test that fails if an op ignores the current stream; sync debug mode "error" over a
    training step and a sampling call. On CPU (dry run) the training step and the sampling call
    run, the CUDA-only checks are reported as not applicable."""
    import torch

    import vdmpp.kernels as K

    out = {}
    if device != "cuda":
        _train_step(device)
        _sample(device)
        return {"train_step": "ran (cpu)", "sample": "ran (cpu)", "cuda_graph": "n/a on cpu",
                "side_stream": "n/a on cpu", "sync_debug": "n/a on cpu"}  # fmt: skip
    g = torch.Generator(device="cuda").manual_seed(0)
    x, d1, d2 = (torch.randn(8, 3, 64, 64, generator=g, device="cuda") for _ in range(3))
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        K.heun_step(x, d1, d2, 2.0, 1.5)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = K.heun_step(x, d1, d2, 2.0, 1.5)
    graph.replay()
    torch.cuda.synchronize()
    out["heun_graph_equal"] = bool(torch.equal(y, K.heun_step(x, d1, d2, 2.0, 1.5)))
    lam = torch.randn(100_000, generator=g, device="cuda") * 8
    val = torch.rand(100_000, generator=g, device="cuda")
    pair = {}
    for n in (4096, 100_000):
        ema, cdf = torch.ones(100, device="cuda"), torch.zeros(101, device="cuda")
        ema_e, cdf_e = ema.clone(), cdf.clone()
        stats = torch.zeros(2, 100, device="cuda")
        with torch.cuda.stream(s):
            K.adaptive_bin_stats(stats.clone(), lam[:n], val[:n], -20, 20)
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            stats.zero_()
            K.adaptive_bin_stats(stats, lam[:n], val[:n], -20, 20)
            K.adaptive_apply_stats(ema, cdf, stats, 0.9)
        for _ in range(3):
            graph.replay()
            st = torch.zeros(2, 100, device="cuda")
            K.adaptive_bin_stats(st, lam[:n], val[:n], -20, 20)
            K.adaptive_apply_stats(ema_e, cdf_e, st, 0.9)
        torch.cuda.synchronize()
        pair[str(n)] = bool(torch.equal(ema, ema_e) and torch.equal(cdf, cdf_e))
    out["adaptive_pair_graph_equal"] = pair
    new = [t + 1.5 for t in (x, d1, d2)]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(100_000_000)
        for dst, src in zip((x, d1, d2), new):
            dst.copy_(src)
        z = K.heun_step(x, d1, d2, 2.0, 1.0)
    side.synchronize()
    cpu = [t.cpu() for t in new]
    out["side_stream_ok"] = bool(torch.equal(z.cpu(), K.heun_step(*cpu, 2.0, 1.0)))
    _train_step("cuda")  # warm-up (lazy inits may sync once)
    _sample("cuda")
    torch.cuda.synchronize()
    sync = {}
    for name, fn in (("train_step", _train_step), ("sample", _sample)):
        torch.cuda.set_sync_debug_mode("error")
        try:
            fn("cuda")
            sync[name] = "no sync"
        except RuntimeError as e:
            sync[name] = f"SYNC: {str(e).splitlines()[0][:200]}"
        finally:
            torch.cuda.set_sync_debug_mode(0)
    out["sync_debug"] = sync
    failed = [k for k, v in out.items() if v is False] + [
        f"pair {k}" for k, v in pair.items() if not v
    ] + [k for k, v in sync.items() if v != "no sync"]  # fmt: skip
    if failed:
        raise SystemExit(f"graphs: failed {failed}: {json.dumps(out)}")
    return out


WORKERS = {"smoke": worker_smoke, "exactness": worker_exactness, "graphs": worker_graphs}


def run_worker(name: str, device: str, small: bool) -> None:
    rec = WORKERS[name](device, small)
    print("RESULT " + json.dumps(rec), flush=True)


# --- the runner ------------------------------------------------------------------------------
class Runner:
    def __init__(self, out: Path, budget: float, dry_run: bool, python: str) -> None:
        self.out, self.budget, self.dry, self.py = out, budget, dry_run, python
        self.t0 = time.monotonic()
        self.records: list[dict] = []
        (out / "phases").mkdir(parents=True, exist_ok=True)
        self.device = "cpu" if dry_run else "cuda"
        self.env = dict(os.environ)
        self.env["PYTHONUNBUFFERED"] = "1"
        # On the GPU the build phase compiles vdmpp.kernels in place (pip install -e ./csrc), so
        # the sources are the package; a dry run builds nothing and must use the vdmpp.kernels
        # this Python has installed (the source tree has no compiled _C to shadow it with).
        kernels_src = [] if dry_run else [str(ROOT / "csrc" / "src")]
        self.env["PYTHONPATH"] = os.pathsep.join(
            kernels_src
            + [str(ROOT / "libs" / n / "src") for n in LIBS]
            + [str(ROOT / "apps" / "train" / "src"), self.env.get("PYTHONPATH", "")]
        )

    def left(self) -> float:
        return self.budget - (time.monotonic() - self.t0)

    def stand_in(self, cmd: list[str]) -> list[str]:
        """Dry run: a command that prints what would run (and a ptxas-like line for the parser)."""
        text = " ".join(cmd)
        code = (
            "import sys; print('dry run, would run:', sys.argv[1]); "
            "print('ptxas info    : Used 30 registers, used 0 barriers, 420 bytes cmem[0]')"
        )
        return [self.py, "-c", code, text]

    def sh(self, cmd: list[str], log, timeout: float, env=None, gpu: bool = True) -> dict:
        """Run cmd (a stand-in in a dry run when it needs the GPU) under timeout, output to log."""
        if self.dry and gpu:
            cmd = self.stand_in(cmd)
        log.write(f"$ {' '.join(cmd)}\n")
        log.flush()
        t0 = time.monotonic()
        p = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=env or self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # its own process group: killed whole on a timeout
        )
        try:
            text, _ = p.communicate(timeout=max(timeout, 1.0))
            rc, timed_out = p.returncode, False
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, 9)
            text, _ = p.communicate()
            rc, timed_out = None, True
        log.write(text or "")
        log.write(f"\n[rc={rc} timed_out={timed_out} {time.monotonic() - t0:.1f}s]\n")
        log.flush()
        return {"rc": rc, "timed_out": timed_out, "output": text or "",
                "seconds": round(time.monotonic() - t0, 2)}  # fmt: skip

    def worker(self, name: str, log, timeout: float, env=None) -> dict:
        cmd = [self.py, str(Path(__file__).resolve()), "--worker", name, "--device", self.device]
        if self.dry:
            cmd.append("--small")
        r = self.sh(cmd, log, timeout, env=env, gpu=False)
        m = re.findall(r"^RESULT (.*)$", r["output"], flags=re.M)
        r["result"] = json.loads(m[-1]) if m else None
        return r

    def phase(self, index: int, name: str, timeout: float) -> dict:
        stem = f"{index:02d}-{name}"
        rec = {"phase": name, "timeout_s": timeout, "log": f"phases/{stem}.log"}
        left = self.left()
        if left < 5:
            rec.update(status="skipped", why=f"overall budget of {self.budget:.0f} s spent")
        else:
            limit = min(timeout, left)
            rec["limit_s"] = round(limit, 1)
            t0 = time.monotonic()
            with open(self.out / "phases" / f"{stem}.log", "w") as log:
                try:
                    rec.update(getattr(self, f"do_{name}")(log, limit))
                except Exception as e:  # a bug in a phase must not stop the later ones
                    rec.update(status="error", why=f"{type(e).__name__}: {e}")
            rec["seconds"] = round(time.monotonic() - t0, 2)
        (self.out / "phases" / f"{stem}.json").write_text(json.dumps(rec, indent=2) + "\n")
        self.records.append(rec)
        self.write_summary()
        return rec

    def write_summary(self) -> None:
        summary = {
            "dry_run": self.dry,
            "device": self.device_name(),
            "budget_s": self.budget,
            "elapsed_s": round(time.monotonic() - self.t0, 1),
            "phases": self.records,
        }
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        with tarfile.open(self.out / "gpu_check.tar.gz.part", "w:gz") as tar:
            for p in sorted(self.out.rglob("*")):
                if p.is_file() and not p.name.startswith("gpu_check.tar.gz"):
                    tar.add(p, arcname=str(p.relative_to(self.out)))
        os.replace(self.out / "gpu_check.tar.gz.part", self.out / "gpu_check.tar.gz")

    def device_name(self) -> str:
        if self.dry:
            return "cpu (dry run)"
        try:
            q = subprocess.run(["nvidia-smi", "--query-gpu=name,compute_cap,driver_version",
                                "--format=csv,noheader"], capture_output=True, text=True,
                               timeout=20)  # fmt: skip
            return q.stdout.strip() or "unknown"
        except (OSError, subprocess.TimeoutExpired):
            return "unknown (no nvidia-smi)"

    @staticmethod
    def status(r: dict) -> str:
        return "timeout" if r["timed_out"] else ("ok" if r["rc"] == 0 else "failed")

    def arch(self) -> str:
        """The device's compute capability only (e.g. "9.0"), from nvidia-smi or torch."""
        if self.dry:
            return "dry-run"
        try:
            q = subprocess.run(["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"],
                               capture_output=True, text=True, timeout=20)  # fmt: skip
            cap = q.stdout.strip().splitlines()[0].strip()
            if re.fullmatch(r"\d+\.\d+", cap):
                return cap
        except (OSError, subprocess.TimeoutExpired, IndexError):
            pass
        code = "import torch; print('%d.%d' % torch.cuda.get_device_capability())"
        return subprocess.run([self.py, "-c", code], capture_output=True, text=True,
                              timeout=60).stdout.strip()  # fmt: skip

    # --- phases ---
    def do_build(self, log, limit: float) -> dict:
        arch = self.arch()
        env = dict(self.env, FORCE_CUDA="1", TORCH_CUDA_ARCH_LIST=arch, VDMPP_PTXAS_VERBOSE="1",
                   MAX_JOBS=str(os.cpu_count() or 4))  # fmt: skip
        env.pop("PYTHONPATH", None)  # build against the installed torch, not the sources
        pip = [self.py, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "--no-index"]
        r = self.sh([*pip, "-v", "-e", "./csrc"], log, limit, env=env)
        ptxas = [ln.strip() for ln in r["output"].splitlines()
                 if "ptxas info" in ln or "spill" in ln or "Compiling entry" in ln]  # fmt: skip
        (self.out / "ptxas.txt").write_text("\n".join(ptxas) + "\n")
        # The libraries and the train app are not installed (hatchling, their build backend, is
        # not on the device): every later phase imports them from the sources (PYTHONPATH).
        rec = {"status": self.status(r), "arch": arch, "ptxas_lines": len(ptxas)}
        spills = [ln for ln in ptxas if re.search(r"[1-9]\d* bytes spill", ln)]
        rec["spills"] = spills[:20]
        return rec

    def _smoke(self, log, limit: float, env) -> dict:
        r = self.worker("smoke", log, limit, env=env)
        started = re.findall(r"^START (\S+)", r["output"], flags=re.M)
        ok = re.findall(r"^OK (\S+)", r["output"], flags=re.M)
        rec = {"ops_ok": ok}
        if r["timed_out"]:
            hung = [s for s in started if s not in ok]
            rec.update(status="hang", hang_op=hung[-1] if hung else None)
        else:
            rec["status"] = self.status(r)
            if r["rc"] != 0:
                rec["error_tail"] = r["output"][-2000:]
        return rec

    def do_smoke(self, log, limit: float) -> dict:
        t0 = time.monotonic()
        rec = self._smoke(log, min(limit, 60.0), self.env)
        if self.dry:  # prove that a hang is reported as one: an op that sleeps, 3 s timeout
            left = limit - (time.monotonic() - t0)
            planted = self._smoke(
                log, max(min(left, 3.0), 1.0), dict(self.env, **{HANG_PLANT_ENV: "1"})
            )
            rec["planted"] = {k: planted.get(k) for k in ("status", "hang_op")}
        return rec

    def do_tests(self, log, limit: float) -> dict:
        env = dict(self.env, VDMPP_REQUIRE_CUDA="1")
        cmd = [self.py, "-m", "pytest", "-q", "-x", "--timeout=90", "-p", "xdist", "-n", "8",
               "csrc/tests", "libs/schedules/tests", "libs/samplers/tests",
               f"--junitxml={self.out / 'phases' / 'pytest.xml'}"]  # fmt: skip
        r = self.sh(cmd, log, limit, env=env)
        tail = [ln for ln in r["output"].splitlines() if re.search(r"passed|failed|error", ln)]
        return {"status": self.status(r), "summary": tail[-1] if tail else None,
                "failures": [ln for ln in r["output"].splitlines()
                             if ln.startswith("FAILED")][:50]}  # fmt: skip

    def _worker_phase(self, name: str, log, limit: float) -> dict:
        r = self.worker(name, log, limit)
        rec = {"status": self.status(r), "result": r["result"]}
        if r["rc"] != 0:
            rec["error_tail"] = r["output"][-3000:]
        return rec

    def do_exactness(self, log, limit: float) -> dict:
        return self._worker_phase("exactness", log, limit)

    def do_graphs(self, log, limit: float) -> dict:
        return self._worker_phase("graphs", log, limit)

    def _copy_results(self, names: list[str]) -> list[str]:
        got = []
        for n in names:
            src = ROOT / "bench" / "results" / n
            if src.is_file():
                (self.out / n).write_bytes(src.read_bytes())
                got.append(n)
        return got

    def _timed(self, cmds: list[list[str]], log, limit: float, env=None) -> dict:
        t0, runs = time.monotonic(), []
        for cmd in cmds:
            left = limit - (time.monotonic() - t0)
            if left < 3:
                runs.append({"cmd": " ".join(cmd[1:]), "status": "skipped (phase time spent)"})
                continue
            r = self.sh(cmd, log, left, env=env)
            runs.append({"cmd": " ".join(cmd[1:]), "status": self.status(r),
                         "seconds": r["seconds"]})  # fmt: skip
        status = "ok" if all(x["status"] == "ok" for x in runs) else "failed"
        return {"status": status, "runs": runs}

    def do_bench(self, log, limit: float) -> dict:
        cmds = [
            [self.py, "bench/kernels.py", "--device", "cuda", "--reps", "10",
             "--out", str(self.out / "kernels-cuda.json")],
            [self.py, "bench/samplers.py", "--device", "cuda", "--repeats", "3", "--no-compile",
             "--out", str(self.out / "samplers-cuda.json")],
        ]  # fmt: skip
        return self._timed(cmds, log, limit)

    def do_train(self, log, limit: float) -> dict:
        run_dir = Path("/tmp/vdmpp-gpu-check-run")
        cmds = [
            [self.py, "bench/train.py", "--device", "cuda", "--schedule-update", "--steps", "10"],
            [self.py, "-m", "vdmpp.train", "digits", "--set", "steps=100", "--set",
             'device="cuda"', "--set", 'precision="bf16"', "--set", f'out="{run_dir}"'],
        ]  # fmt: skip
        rec = self._timed(cmds, log, limit)
        rec["copied"] = self._copy_results(["train-schedule-cuda.json"]) if not self.dry else []
        return rec


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="output folder (default $OUT)")
    ap.add_argument("--budget", type=float, default=480.0, help="overall seconds (default 480)")
    ap.add_argument("--only", default="", help="comma-separated phases to run (default: all)")
    ap.add_argument("--cpu-dry-run", action="store_true", help="CPU-side logic only, no GPU")
    ap.add_argument("--python", default=sys.executable, help="interpreter for every command")
    ap.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    ap.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    ap.add_argument("--small", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        run_worker(a.worker, a.device, a.small)
        return 0
    out = a.out or Path(os.environ.get("OUT") or ROOT / "gpu_check_out")
    names = [n for n, _ in PHASES]
    only = [s for s in a.only.split(",") if s]
    unknown = sorted(set(only) - set(names))
    if unknown:
        ap.error(f"unknown phase(s) {unknown}; phases: {','.join(names)}")
    if a.budget <= 0:
        ap.error("--budget must be positive")
    runner = Runner(out, a.budget, a.cpu_dry_run, a.python)
    for i, (name, timeout) in enumerate(PHASES, 1):
        if only and name not in only:
            continue
        rec = runner.phase(i, name, timeout)
        print(f"[gpu_check] {name:<10} {rec['status']:<8} {rec.get('seconds', 0):7.1f}s"
              f"  {rec.get('why', '')}", flush=True)  # fmt: skip
    bad = [r["phase"] for r in runner.records if r["status"] not in ("ok", "skipped")]
    print(f"[gpu_check] wrote {out / 'summary.json'}; not ok: {bad or 'none'}", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
