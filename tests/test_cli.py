"""python -m mltoolkit info / bench."""
import json
import subprocess
import sys
import textwrap

import torch

from mltoolkit.benchmark import run


def test_info_lists_backends():
    out = subprocess.run([sys.executable, "-m", "mltoolkit", "info"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    for word in ("torch", "triton", "_C", "norm", "cpp", "reference", "cuda"):
        assert word in out.stdout


BENCH = textwrap.dedent('''
    import torch
    from mltoolkit import ops
    from mltoolkit.benchmark import Benchmark
    from mltoolkit.ops.reference import norm as ref

    def undifferentiated(x, w):
        if x.requires_grad or w.requires_grad:
            raise RuntimeError("a forward-only case was differentiated")
        return ops.rms_norm(x, (x.shape[-1],), w)

    def benchmarks(device, quick):
        good = lambda x, w: ops.rms_norm(x, (x.shape[-1],), w)
        eager = lambda x, w: torch.nn.functional.rms_norm(x, (x.shape[-1],), w)
        refn = lambda x, w: ref.rms_norm(x, (x.shape[-1],), w)
        make = lambda c, dtype, dev: (torch.randn(c["M"], c["N"], dtype=dtype, device=dev),
                                      torch.randn(c["N"], dtype=dtype, device=dev))
        nbytes = lambda c, dtype, mode: 3 * c["M"] * c["N"] * 4
        return [Benchmark("tiny_rms", "norm", good, eager, refn, make, [{"M": 8, "N": 32}], [torch.float32],
                          grad_args=(0, 1), bytes=nbytes),
                Benchmark("broken_rms", "norm", lambda x, w: good(x, w) + 1, eager, refn, make,
                          [{"M": 8, "N": 32}], [torch.float32], grad_args=(0, 1), modes=("fwd",)),
                Benchmark("broken_baseline", "norm", good, lambda x, w: eager(x, w) * 1.1, refn, make,
                          [{"M": 8, "N": 32}], [torch.float32], grad_args=(0, 1), modes=("fwd",)),
                Benchmark("forward_only", "norm", undifferentiated, eager, refn, make, [{"M": 8, "N": 32}],
                          [torch.float32], grad_args=(0, 1), modes=("fwd",))]
''')


def test_bench_writes_rows_table_and_plot(tmp_path):
    bench_dir = tmp_path / "benchmarks"
    bench_dir.mkdir()
    (bench_dir / "bench_tiny.py").write_text(BENCH)
    rows = run("cpu", quick=True, bench_dir=bench_dir, out_dir=tmp_path / "out", log=lambda *_: None)
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    slug = files[0].rsplit(".", 1)[0]
    assert {f"{slug}.jsonl", f"{slug}.md"} <= set(files)
    lines = [json.loads(x) for x in (tmp_path / "out" / f"{slug}.jsonl").read_text().splitlines()]
    timed = [r for r in lines if "median_ms" in r]
    # --quick on the CPU times one mode per op: fwd+bwd where the op trains; the full run times all three
    assert {r["mode"] for r in timed if r["op"] == "tiny_rms"} == {"fwd+bwd"}
    assert {r["mode"] for r in timed if r["op"] == "forward_only"} == {"fwd"}
    full = run("cpu", quick=False, ops=["tiny_rms"], bench_dir=bench_dir, out_dir=tmp_path / "full",
               log=lambda *_: None)
    assert {r["mode"] for r in full if "median_ms" in r} == {"fwd", "bwd", "fwd+bwd"}
    assert {"torch eager", "torch.compile"} <= {r["provider"] for r in timed}
    for key in ("op", "provider", "mode", "config", "dtype", "device", "median_ms", "p20_ms", "p80_ms",
                "speedup_vs_eager", "speedup_vs_compile", "gbps", "peak_mem_bytes", "max_abs_err", "torch",
                "triton", "git_sha", "timestamp", "threads"):
        assert key in timed[0], key
    eager = [r for r in timed if r["provider"] == "torch eager"]
    assert all(abs(r["speedup_vs_eager"] - 1.0) < 1e-9 for r in eager)
    # the wrong provider is reported, never timed
    broken = [r for r in rows if r["op"] == "broken_rms" and r["provider"].startswith("mltoolkit")]
    assert broken and all("error" in r and "median_ms" not in r for r in broken)
    md = (tmp_path / "out" / f"{slug}.md").read_text()
    assert "Failed correctness" in md
    # a wrong torch baseline is still timed (it is the yardstick) and its finding is kept
    base = [r for r in timed if r["op"] == "broken_baseline" and r["provider"] == "torch eager"]
    assert base and "output 0" in base[0]["baseline_outside_tolerance"]
    assert "baselines outside the tolerance" in md
    assert torch.get_num_threads() == timed[0]["threads"]
    # CPU results are kept apart by the vector ISA torch's kernels use (a VM's model name does not tell)
    assert timed[0]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert slug.endswith("-" + timed[0]["cpu_capability"].lower())
    # a forward-only case is checked as it is timed, without gradients
    assert {r["provider"] for r in timed if r["op"] == "forward_only"} >= {"mltoolkit[cpp]", "torch eager"}


def test_sqnr_gate():
    """Quantized ops are judged by SQNR against the reference: a provider below the floor fails the gate."""
    from mltoolkit.benchmark.harness import _check

    x = torch.randn(64, 64, generator=torch.Generator().manual_seed(0))
    noisy = lambda t: t + 0.01 * torch.randn(t.shape, generator=torch.Generator().manual_seed(1))  # ~40 dB
    errs, failure, sqnrs = _check(noisy, (x,), [x], [], [], [], torch.float32, sqnr_floor=35.0)
    assert failure is None and 35 < sqnrs[0] < 45 and errs[0] > 0
    _, failure, _ = _check(noisy, (x,), [x], [], [], [], torch.float32, sqnr_floor=45.0)
    assert failure is not None and "below the floor" in failure
    _, failure, _ = _check(noisy, (x,), [x], [], [], [], torch.float32)  # the tolerance table rejects it
    assert failure is not None


def test_cpu_timer_times_each_short_call_after_its_own():
    """Interleaved CPU timing: every timed call shorter than _OWN_CACHE_S follows an untimed call of the same
    provider, so no provider's time depends on which other one ran before it; a longer one goes without it."""
    import time

    from mltoolkit.benchmark import harness

    calls = []

    def provider(name, seconds=0.0):
        def call():
            calls.append(name)
            time.sleep(seconds)
        return call

    fns = {name: provider(name) for name in ("a", "b", "c")}
    timings = harness._Timer("cpu", budget_s=0.0).interleaved(fns, max_reps=5)
    assert {name: t.reps for name, t in timings.items()} == {"a": 5, "b": 5, "c": 5}
    assert calls[:3] == ["a", "b", "c"]  # one untimed call each, whose time sets the reps
    assert calls[3:] == [name for _ in range(5) for name in ("a", "b", "c") for _ in range(2)]

    calls.clear()  # the caller's own untimed call stands in for the first
    timings = harness._Timer("cpu", budget_s=0.0).interleaved(fns, max_reps=5, once_s={"a": 1e-3, "c": 1e-3})
    assert calls[:1] == ["b"] and len(calls) == 1 + 5 * 3 * 2

    calls.clear()
    fns = {"short": provider("short"), "long": provider("long", 1.5 * harness._OWN_CACHE_S)}
    timings = harness._Timer("cpu", budget_s=0.0).interleaved(fns, max_reps=2)
    assert calls == ["short", "long"] + ["short", "short", "long"] * 2
