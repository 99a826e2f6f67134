"""Integer helpers for the kernels' host code (grids, block sizes).

triton.cdiv and triton.next_power_of_2 are constexpr_function objects in Triton 3.5+: a host call goes through
their wrapper (arguments unwrapped one by one) and cost ~5-15 us each on the 2-core VM, several per op call on the
host's critical path. These are the plain-Python equivalents; kernels keep tl.cdiv."""


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n for n >= 1, and 0 for 0: triton.next_power_of_2's values."""
    return n if n <= 1 else 1 << (n - 1).bit_length()
