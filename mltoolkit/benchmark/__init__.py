"""The benchmark harness: one command, `python -m mltoolkit bench`, for every op.

A benchmark file under benchmarks/ defines `benchmarks(device, quick) -> list[Benchmark]`: how to build inputs,
the mltoolkit function, the torch function it replaces, the reference, and how many bytes / FLOPs a call must
move. The harness adds the providers (every mltoolkit backend that accepts the input, torch eager, torch.compile),
checks each against the reference, then times forward, backward and forward+backward and writes
benchmarks/results/<device>.jsonl, a markdown table and a PNG plot.
"""
from mltoolkit.benchmark.harness import Benchmark, main, run

__all__ = ["Benchmark", "run", "main"]
