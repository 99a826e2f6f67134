"""Helpers shared by the CUDA self-check scripts: the GPU timer (median milliseconds of fn() over `reps` calls, each
timed with CUDA events after three warm-up calls) and the bad-input checker."""
import torch


def median_ms(fn, reps: int) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def expect_named_errors(cases, fail) -> int:
    """cases: (name, call, argument name); each call must raise a RuntimeError naming the argument, else
    fail(case, message). Returns the number of cases."""
    for name, fn, arg in cases:
        try:
            fn()
        except RuntimeError as e:
            if arg not in str(e):
                fail(f"bad input: {name}", f"error does not name '{arg}': {str(e).splitlines()[0]}")
        except Exception as e:  # noqa: BLE001
            fail(f"bad input: {name}", f"raised {type(e).__name__} instead of RuntimeError")
        else:
            fail(f"bad input: {name}", "no error raised")
    return len(cases)
