"""python -m mltoolkit {info, bench}."""
import gc
import sys


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m mltoolkit {info,bench} [options]\n"
              "  info   versions, devices, built kernels, available backends\n"
              "  bench  benchmark harness (bench --help)")
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "info":
        from mltoolkit.info import report
        print(report())
        return 0
    if cmd == "bench":
        from mltoolkit.benchmark import main as bench_main
        return bench_main(rest)
    print(f"python -m mltoolkit: unknown command {cmd!r} (info, bench)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    rc = main()
    # The interpreter's exit would run full garbage collections over every object the work left (a benchmark run's
    # torch.compile builds: 2-4 s on the 2-core VM, 0.5 s with them frozen); the process ends here.
    gc.freeze()
    sys.exit(rc)
