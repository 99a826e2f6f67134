"""Loads the compiled extension mltoolkit._C without ever failing the import of mltoolkit."""
from __future__ import annotations

import functools
import importlib.util
import math
import os
import weakref
from typing import Optional

import torch

from mltoolkit.backends import forced_backend

try:
    from mltoolkit import _C  # type: ignore[attr-defined]

    C_ERROR: Optional[str] = None
except ImportError as exc:  # not built, or built against another torch
    _C = None
    if importlib.util.find_spec("mltoolkit._C") is None:
        C_ERROR = "mltoolkit._C is not built; build it with `pip install --no-build-isolation --no-deps -e .`"
    else:
        C_ERROR = f"mltoolkit._C failed to load ({exc}); rebuild it against this torch"


def cpp_unavailable() -> Optional[str]:
    return C_ERROR


def cuda_unavailable() -> Optional[str]:
    if _C is None:
        return C_ERROR
    if not _C.with_cuda:
        return "mltoolkit._C was built without CUDA kernels (CPU torch, no nvcc, or MLTK_SKIP_CUDA=1)"
    return None


@functools.cache
def triton_unavailable() -> Optional[str]:
    """Asked on every op call by the backend tables: answered once (whether triton imports cannot change)."""
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return f"triton is not importable ({exc})"
    return None


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Device predicates shared by the backend tables (None: accepted; else the reason), given an op's first tensor.
# They run for every op call, so the common answers are prebuilt strings and `is_cpu` / `is_cuda` (reading
# `x.device` builds a torch.device, ~0.2 us).
_NEEDS_CUDA_GOT_CPU = "needs a CUDA tensor, got cpu"
_NEEDS_CPU_GOT_CUDA = "needs a CPU tensor, got cuda"
_TRITON_CPU_UNFORCED = "CPU tensors run through Triton only when forced"


def on_cuda(x, *_) -> Optional[str]:
    if x.is_cuda:
        return None
    return _NEEDS_CUDA_GOT_CPU if x.is_cpu else f"needs a CUDA tensor, got {x.device.type}"


def on_cpu(x, *_) -> Optional[str]:
    if x.is_cpu:
        return None
    return _NEEDS_CPU_GOT_CUDA if x.is_cuda else f"needs a CPU tensor, got {x.device.type}"


def triton_device(x, *_) -> Optional[str]:
    if x.is_cuda:
        return None
    if x.is_cpu:
        # The interpreter is a correctness tool, far too slow to be picked on its own.
        if forced_backend() != "triton":
            return _TRITON_CPU_UNFORCED
        if triton_interpreted():
            return None
    return "needs a CUDA tensor (or TRITON_INTERPRET=1 and a forced 'triton' backend)"


def rows_above(t, most: int, faster: str) -> Optional[str]:
    """The reason a backend defers t, of more than `most` rows (all dims but the last), to `faster`; None if not."""
    rows = t.numel() // max(t.shape[-1], 1)
    return f"{rows} rows: {faster} is faster above {most}" if rows > most else None


def defer_above_rows(most: int, faster: str):
    """A backend's `defer` (mltoolkit.backends): inputs of more than `most` rows go to the next accepting kernel,
    measured faster (`faster` names it in the reason)."""
    def defer(t, *_) -> Optional[str]:
        return rows_above(t, most, faster)
    return defer


def as_rows(x):
    """x (..., K) as a (rows, K) matrix, for the linear ops' 2-D kernels (reshape costs ~0.6 us a call even when it
    changes nothing, so a 2-D x is returned as is; math.prod keeps K = 0 working)."""
    return x if x.dim() == 2 else x.reshape(math.prod(x.shape[:-1]), x.shape[-1])


def from_rows(y, x):
    """The (rows, N) result of a linear op on as_rows(x), shaped (..., N) like x."""
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], y.shape[-1])


_DERIVED: dict[tuple, tuple] = {}


def derived(kind: str, tensors: tuple, extra: tuple, compute):
    """compute(*tensors) (one `kind` of value derived from them), remembered while `tensors` (the first one a
    tensor, the others tensors or None) are alive, unchanged and the very same objects, and `extra` is equal: an
    in-place change (version counter), a new storage or a new tensor in their place computes it again. Works in
    registered ops under torch.compile too, which hand them the module's own parameter objects. Only weak
    references to `tensors` are kept (the entry goes when tensors[0] does). Addresses and versions alone would not
    do: a new tensor often takes a freed one's address with the same version (a reassigned parameter, or a
    parametrization such as a pruning mask, which makes a new weight on every access). Not seen: a change made
    through `t.data` (its own version counter); clear_caches() after one."""
    stamp = [*extra]
    for t in tensors:
        if t is not None and t.is_inference():  # made under torch.inference_mode: no version counter to watch
            return compute(*tensors)
        stamp.append(None if t is None else (t.data_ptr(), t._version))
    key = (kind, id(tensors[0]))
    entry = _DERIVED.get(key)
    if entry is not None and entry[1] == stamp and all(
            (r is None) if t is None else (r is not None and r() is t) for r, t in zip(entry[0], tensors)):
        return entry[2]
    value = compute(*tensors)
    # The first tensor's reference drops the entry when it dies (before its id can be reused).
    refs = (weakref.ref(tensors[0], lambda _, key=key: _DERIVED.pop(key, None)),
            *(None if t is None else weakref.ref(t) for t in tensors[1:]))
    _DERIVED[key] = (refs, stamp, value)
    return value


def clear_caches() -> int:
    """Drops every value kept by `derived` (inference conv folds and weight layouts, int8 packed weights); they are
    made again on use. Returns how many there were. For memory: entries otherwise live as long as their weights, also
    after those have changed (e.g. between periodic evaluations during training). Also frees the CPU kernels' kept
    output blocks (csrc/cpu/reused_memory.h: up to MLTK_REUSED_MEMORY_MB, 512 by default, of freed outputs of 1 MiB
    and more, kept for the next call of the same size)."""
    count = len(_DERIVED)
    _DERIVED.clear()
    if _C is not None and hasattr(_C, "release_reused_memory"):
        _C.release_reused_memory()
    return count


def needs_grad(*tensors) -> bool:
    """Whether autograd records a call on these tensors (None entries allowed)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


@functools.cache
def onednn_linear_available() -> bool:
    """Whether torch has oneDNN and its fused linear op (mkldnn._linear_pointwise)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


@torch.library.custom_op("mltoolkit::onednn_linear", mutates_args=())
def _onednn_linear_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], activation: str,
                      algorithm: str) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, activation, [], algorithm)


@_onednn_linear_op.register_fake
def _(x, weight, bias, activation, algorithm):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def onednn_linear(x, weight, bias, activation: str = "none", algorithm: str = ""):
    """activation(x @ weight.T + bias) as one oneDNN matmul with the activation in its epilogue
    (torch.ops.mkldnn._linear_pointwise): float32 CPU, outside autograd; the caller checks that, and
    `onednn_linear_traceable`. Eager calls run the oneDNN op directly; a compiled graph gets it as
    mltoolkit::onednn_linear, which Inductor calls as it is: Inductor lowers mkldnn._linear_pointwise only with a
    frozen (constant) weight and otherwise runs its own GEMM (MKL's, ~2x slower than oneDNN's on the AMD dev VM)."""
    if torch.compiler.is_compiling():
        return torch.ops.mltoolkit.onednn_linear(x, weight, bias, activation, algorithm)
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, activation, [], algorithm)


def onednn_linear_traceable(*tensors) -> bool:
    """Whether `onednn_linear` may run here: plain tensors (no subclass such as DTensor), in eager or inside
    torch.compile / export (the registered op); not under other tracers, functorch transforms or modes, which take
    F.linear."""
    return plain_eager(*tensors) or (torch.compiler.is_compiling()
                                     and all(t is None or type(t) in _PLAIN for t in tensors))


def onednn_mm(a, b):
    """a @ b for 2-D float32 CPU matrices, outside autograd (a backward's GEMMs), through oneDNN's matmul
    (torch.ops.mkldnn._linear_pointwise, b transposed into its weight): ~2.2x torch's a @ b on the AMD dev VM, whose
    MKL sgemm runs ~200 GFLOP/s on 2 cores against oneDNN's ~450 ((512 x 1024) @ (1024 x 256) and larger). Anything
    else (other dtypes or devices, autograd, compiled or traced calls), or a torch without the op, is a @ b."""
    if (a.dtype == torch.float32 and b.dtype == torch.float32 and a.is_cpu and b.is_cpu and a.dim() == 2
            and b.dim() == 2 and a.shape[0] > 0 and a.shape[1] > 0 and b.shape[1] > 0
            and torch.backends.mkldnn.enabled and onednn_linear_available() and not needs_grad(a, b)
            and plain_eager(a, b)):  # Inductor lowers the oneDNN op only with a constant weight
        try:
            # b^T as a strided view: oneDNN reorders the weight operand itself, and a contiguous copy first made
            # the call ~0.5-1 ms slower for an LSTM layer's (2048, 512) w_ih (measured on the dev VM)
            return torch.ops.mkldnn._linear_pointwise(a.contiguous(), b.t(), None, "none", [], "")
        except RuntimeError:
            pass
    return a @ b


def gemm_tn(a, b):
    """a^T @ b for a (K, M), b (K, N): float32 CPU calls outside autograd go to the C++ gemm_tn_cpu (both operands
    transposed into kept memory by blocks, then oneDNN's matmul; a backward's weight gradients, summed over rows);
    anything else is a.t() @ b."""
    if (a.dtype == torch.float32 and a.is_cpu and b.is_cpu and a.dim() == 2 and b.dim() == 2
            and torch.backends.mkldnn.enabled and _C is not None and hasattr(_C, "gemm_tn_cpu")
            and not needs_grad(a, b) and plain_eager(a, b)):
        return _C.gemm_tn_cpu(a, b)
    return a.t() @ b


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def plain_eager(*tensors) -> bool:
    """True outside every tracer, transform and mode, on plain tensors: there a registered op and its eager
    autograd.Function twin (which skips the custom-op dispatch) are interchangeable. Anything compiled, exported,
    faked, vmapped or intercepted takes the registered op."""
    if (torch.compiler.is_compiling() or torch.jit.is_tracing() or torch._C._are_functorch_transforms_active()
            or torch._C._len_torch_function_stack() or torch._C._len_torch_dispatch_stack()):
        return False
    for t in tensors:  # (a loop: any() over a generator costs ~0.4 us more a call)
        if t is not None and type(t) not in _PLAIN:
            return False
    return True


def call_op(op, eager_function, impl, args: tuple, tensors: tuple, grad_tensors: Optional[tuple] = None):
    """op(*args) (a registered op) or, when `tensors` are plain eager, its twin without the op dispatch:
    eager_function.apply (an autograd.Function) when autograd records and one of `grad_tensors` (default: tensors)
    requires grad, impl(*args) otherwise."""
    if not plain_eager(*tensors):
        return op(*args)
    if needs_grad(*(grad_tensors or tensors)):
        return eager_function.apply(*args)
    return impl(*args)
