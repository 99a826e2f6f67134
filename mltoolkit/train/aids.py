"""Training aids (issue 6, part 2), pure PyTorch, used by the Trainer and usable on their own:

    GradientNoise(model, eta=0.01, gamma=0.55, seed=0)     # annealed Gaussian gradient noise (Neelakantan et al. 2015)
    GradAccumulator(model, optimizer, steps=4, amp=amp)    # loss / N, optimizer step every N micro-batches, DDP no_sync
    checkpoint_modules(model, (nn.TransformerEncoderLayer,))  # activation checkpointing, state_dict keys unchanged
    Amp("bf16" | "fp16" | None, device)                    # autocast + GradScaler (fp16), unscale before clipping
    DevicePrefetcher(loader, "cuda")                       # pinned non_blocking copies, one batch ahead, side stream
"""
from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

__all__ = ["GradientNoise", "GradAccumulator", "checkpoint_modules", "uncheckpoint_modules", "Amp",
           "DevicePrefetcher", "move_to_device"]


def _params(params: Union[nn.Module, Iterable[Tensor]], name: str) -> list[Tensor]:
    if isinstance(params, nn.Module):
        out = list(params.parameters())
    elif isinstance(params, Tensor):
        out = [params]
    else:
        try:
            out = list(params)
        except TypeError:
            raise TypeError(f"{name} must be a module or an iterable of tensors, got {type(params).__name__}") from None
        if out and isinstance(out[0], dict):  # param groups
            out = [p for g in out for p in g["params"]]
    if not all(isinstance(p, Tensor) for p in out):
        raise TypeError(f"{name} must hold tensors")
    return out


# ---- gradient noise -----------------------------------------------------------------------------------------------
class GradientNoise:
    """Annealed Gaussian gradient noise (Neelakantan et al. 2015, "Adding Gradient Noise Improves Learning for Very
    Deep Networks"): after ``backward()`` (and after unscaling, before clipping / ``optimizer.step()``), call
    ``noise.add_()``; it adds N(0, sigma_t^2) to every gradient, with ``sigma_t^2 = eta / (1 + t) ** gamma`` and
    ``t`` the number of previous calls (one per optimizer step). The paper uses eta in {0.01, 0.3, 1.0},
    gamma = 0.55.

    The noise comes from a ``torch.Generator`` per device, seeded with ``seed`` (default: drawn from torch's global
    generator), so runs are reproducible; ``state_dict()`` holds ``t`` and the generator states for resuming.
    """

    def __init__(self, params: Union[nn.Module, Iterable[Tensor]], eta: float = 0.01, gamma: float = 0.55,
                 seed: Optional[int] = None) -> None:
        if not isinstance(eta, (int, float)) or isinstance(eta, bool) or eta < 0:
            raise ValueError(f"eta must be a non-negative number, got {eta!r}")
        if not isinstance(gamma, (int, float)) or isinstance(gamma, bool) or gamma < 0:
            raise ValueError(f"gamma must be a non-negative number, got {gamma!r}")
        self.params = _params(params, "params")
        self.eta, self.gamma = float(eta), float(gamma)
        self.seed = int(torch.randint(0, 2**62, ()).item()) if seed is None else int(seed)
        self.t = 0
        self._gens: dict[str, torch.Generator] = {}

    def sigma(self, t: Optional[int] = None) -> float:
        """The noise standard deviation at step ``t`` (default: the next call's)."""
        t = self.t if t is None else t
        return math.sqrt(self.eta / (1 + t) ** self.gamma)

    def _gen(self, device: torch.device) -> torch.Generator:
        key = str(device)
        if key not in self._gens:
            g = torch.Generator(device=device)
            g.manual_seed(self.seed + (device.index or 0))
            self._gens[key] = g
        return self._gens[key]

    @torch.no_grad()
    def add_(self) -> float:
        """Add the noise of the current step to all gradients present; returns the sigma used."""
        sigma = self.sigma()
        self.t += 1
        if sigma == 0.0:
            return sigma
        for p in self.params:
            g = p.grad
            if g is None:
                continue
            if g.is_sparse:
                raise ValueError("GradientNoise does not support sparse gradients")
            noise = torch.randn(g.shape, generator=self._gen(g.device), device=g.device, dtype=torch.float32)
            g.add_(noise.to(g.dtype), alpha=sigma)
        return sigma

    def state_dict(self) -> dict[str, Any]:
        return {"t": self.t, "eta": self.eta, "gamma": self.gamma, "seed": self.seed,
                "rng": {k: g.get_state() for k, g in self._gens.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = {"t", "eta", "gamma", "seed", "rng"} - set(state)
        if missing:
            raise KeyError(f"GradientNoise.load_state_dict: missing keys {sorted(missing)}")
        self.t, self.eta, self.gamma, self.seed = int(state["t"]), state["eta"], state["gamma"], state["seed"]
        self._gens = {}
        for key, rng in state["rng"].items():
            self._gen(torch.device(key)).set_state(rng)


# ---- AMP ----------------------------------------------------------------------------------------------------------
_AMP_DTYPES = {None: None, "none": None, "no": None, "fp32": None, "float32": None,
               "bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
               "half": torch.float16, torch.bfloat16: torch.bfloat16, torch.float16: torch.float16,
               torch.float32: None}


class Amp:
    """Mixed precision as one small object:

        amp = Amp("bf16", device)          # or "fp16" (autocast + GradScaler), or None (plain fp32)
        with amp.autocast():
            loss = loss_fn(model(x), y)
        amp.backward(loss)
        amp.step(optimizer, max_grad_norm=1.0)   # unscale, clip, step (skipped on inf/nan with fp16), scaler update
        optimizer.zero_grad()

    bf16 needs no loss scaling. fp16 uses ``torch.amp.GradScaler`` (on CUDA; torch also runs it on the CPU, slowly);
    ``unscale_(optimizer)`` may be called before clipping by hand, ``step()`` does not unscale twice.
    ``state_dict()`` holds the scaler's state (scale, growth tracker).
    """

    def __init__(self, dtype: Union[str, torch.dtype, None] = None, device: Union[str, torch.device] = "cpu",
                 *, scaler_kwargs: Optional[dict[str, Any]] = None) -> None:
        key = dtype.lower() if isinstance(dtype, str) else dtype
        if key not in _AMP_DTYPES:
            raise ValueError(f"dtype must be one of 'bf16', 'fp16' or None, got {dtype!r}")
        self.dtype: Optional[torch.dtype] = _AMP_DTYPES[key]
        self.device = torch.device(device)
        self.enabled = self.dtype is not None
        self.scaler: Optional[torch.amp.GradScaler] = None
        if scaler_kwargs and self.dtype != torch.float16:
            raise ValueError(f"scaler_kwargs configure fp16's GradScaler; Amp({dtype!r}) has no scaler")
        if self.dtype == torch.float16:
            self.scaler = torch.amp.GradScaler(self.device.type, **(scaler_kwargs or {}))
        self._unscaled: set[int] = set()
        self.last_step_skipped = False

    def __repr__(self) -> str:
        name = {None: "None", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]
        return f"Amp({name}, device={self.device})"

    def autocast(self) -> contextlib.AbstractContextManager:
        if not self.enabled:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def scale(self, loss: Tensor) -> Tensor:
        return self.scaler.scale(loss) if self.scaler is not None else loss

    def backward(self, loss: Tensor, **kwargs: Any) -> None:
        self.scale(loss).backward(**kwargs)

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        """Divide the gradients by the loss scale (no-op without fp16; once per step)."""
        if self.scaler is not None and id(optimizer) not in self._unscaled:
            self.scaler.unscale_(optimizer)
            self._unscaled.add(id(optimizer))

    def clip_grad_norm_(self, optimizer: torch.optim.Optimizer, max_norm: float,
                        parameters: Optional[Iterable[Tensor]] = None) -> Tensor:
        """Unscale, then clip the global gradient norm of ``parameters`` (default: the optimizer's)."""
        self.unscale_(optimizer)
        params = _params(optimizer.param_groups if parameters is None else parameters, "parameters")
        return torch.nn.utils.clip_grad_norm_(params, max_norm)

    def step(self, optimizer: torch.optim.Optimizer, max_grad_norm: Optional[float] = None,
             parameters: Optional[Iterable[Tensor]] = None) -> bool:
        """Optionally clip, then step (through the scaler with fp16) and update the scale. Returns True when the
        optimizer stepped, False when the scaler skipped the step because of inf/nan gradients."""
        if max_grad_norm is not None:
            self.clip_grad_norm_(optimizer, max_grad_norm, parameters)
        self._unscaled.discard(id(optimizer))
        if self.scaler is None:
            optimizer.step()
            self.last_step_skipped = False
            return True
        before = self.scaler.get_scale()
        self.scaler.step(optimizer)
        self.scaler.update()
        self.last_step_skipped = self.scaler.get_scale() < before
        return not self.last_step_skipped

    def state_dict(self) -> dict[str, Any]:
        return {"dtype": str(self.dtype), "scaler": self.scaler.state_dict() if self.scaler is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("dtype") != str(self.dtype):
            raise ValueError(f"Amp.load_state_dict: state is for dtype {state.get('dtype')}, this Amp uses "
                             f"{self.dtype}")
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])


# ---- gradient accumulation ----------------------------------------------------------------------------------------
class GradAccumulator:
    """Gradient accumulation over ``steps`` micro-batches:

        acc = GradAccumulator(model, optimizer, steps=4, amp=amp, max_grad_norm=1.0)
        for x, y in loader:
            with acc.accumulate():                 # model.no_sync() on all but the last micro-batch when DDP
                with amp.autocast():
                    loss = loss_fn(model(x), y)
                acc.backward(loss)                 # (loss / steps).backward(), through amp's scaler when given
            if acc.step():                         # optimizer step + zero_grad on every steps-th micro-batch
                scheduler.step()

    With mean losses over equal micro-batches the update equals one step on the concatenated batch. ``before_step``:
    callables run after unscaling, before clipping and the optimizer step (e.g. ``GradientNoise(model).add_``).
    ``state_dict()`` holds the micro-batch position, so resuming mid-accumulation works.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, steps: int = 1,
                 amp: Optional[Amp] = None, max_grad_norm: Optional[float] = None,
                 before_step: Iterable[Callable[[], Any]] = ()) -> None:
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be an int >= 1, got {steps!r}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self.model, self.optimizer, self.steps = model, optimizer, steps
        self.amp = amp if amp is not None else Amp(None)
        self.max_grad_norm = max_grad_norm
        self.before_step = list(before_step)
        self.micro = 0  # micro-batches accumulated since the last optimizer step
        self.last_grad_norm: Optional[Tensor] = None

    @property
    def is_sync_step(self) -> bool:
        """True when the current micro-batch is the last of its accumulation (gradients are all-reduced)."""
        return self.micro + 1 >= self.steps

    def accumulate(self) -> contextlib.AbstractContextManager:
        """Context for one micro-batch's forward and backward: ``model.no_sync()`` (DDP / anything with no_sync)
        on all but the last micro-batch, nothing otherwise."""
        no_sync = getattr(self.model, "no_sync", None)
        if no_sync is not None and not self.is_sync_step:
            return no_sync()
        return contextlib.nullcontext()

    def backward(self, loss: Tensor, **kwargs: Any) -> None:
        self.amp.backward(loss / self.steps if self.steps > 1 else loss, **kwargs)

    def step(self, force: bool = False) -> bool:
        """Count the micro-batch; on the last one (or with ``force``, e.g. at the end of an epoch) clip, step and
        zero the gradients. Returns whether the optimizer stepped (False too when fp16 skipped an inf/nan step)."""
        self.micro += 1
        if self.micro < self.steps and not force:
            return False
        self.micro = 0
        if self.before_step:
            self.amp.unscale_(self.optimizer)
            for fn in self.before_step:
                fn()
        if self.max_grad_norm is not None:
            self.last_grad_norm = self.amp.clip_grad_norm_(self.optimizer, self.max_grad_norm)
        stepped = self.amp.step(self.optimizer)
        self.optimizer.zero_grad(set_to_none=True)
        return stepped

    def state_dict(self) -> dict[str, Any]:
        return {"micro": self.micro, "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["steps"] != self.steps:
            raise ValueError(f"GradAccumulator.load_state_dict: state has steps={state['steps']}, this one "
                             f"{self.steps}")
        self.micro = int(state["micro"])


# ---- activation checkpointing -------------------------------------------------------------------------------------
def _checkpointed_forward(module: nn.Module, forward: Callable, *args: Any, **kwargs: Any) -> Any:
    if not torch.is_grad_enabled() or not module.training:
        return forward(*args, **kwargs)
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def checkpoint_modules(model: nn.Module,
                       select: Union[type, tuple[type, ...], Callable[[str, nn.Module], bool]]) -> list[str]:
    """Activation checkpointing (``torch.utils.checkpoint``, ``use_reentrant=False``) for the submodules chosen by
    ``select``: a module class, a tuple of classes, or a predicate ``(qualified_name, module) -> bool``. Their
    activations are dropped after the forward and recomputed during backward (same outputs and gradients, RNG such
    as dropout replayed), in training mode with grad enabled; eval / no_grad forwards run plainly.

    The modules are patched in place (an instance ``forward``), so ``state_dict`` keys, ``named_modules`` and hooks
    are unchanged. A module inside an already selected one is not wrapped again. Returns the wrapped names;
    :func:`uncheckpoint_modules` undoes it.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(select, type) or (isinstance(select, tuple) and all(isinstance(t, type) for t in select)):
        types = select
        pred = lambda name, m: isinstance(m, types)  # noqa: E731
    elif callable(select):
        pred = select
    else:
        raise TypeError(f"select must be a module class, a tuple of classes or a predicate, got {select!r}")
    done: list[str] = []
    for name, m in model.named_modules():
        if any(name == d or name.startswith(d + ".") or d == "" for d in done):
            continue
        if "_mltk_ckpt_forward" in m.__dict__ or not pred(name, m):
            continue
        original = m.forward
        m._mltk_ckpt_forward = original
        m.forward = functools.partial(_checkpointed_forward, m, original)
        done.append(name)
    return done


def uncheckpoint_modules(model: nn.Module) -> list[str]:
    """Undo :func:`checkpoint_modules`; returns the names restored."""
    names = []
    for name, m in model.named_modules():
        if "_mltk_ckpt_forward" in m.__dict__:
            del m.__dict__["forward"]
            del m.__dict__["_mltk_ckpt_forward"]
            names.append(name)
    return names


# ---- device prefetcher --------------------------------------------------------------------------------------------
def _map_tensors(fn: Callable[[Tensor], Tensor], obj: Any) -> Any:
    if isinstance(obj, Tensor):
        return fn(obj)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*(_map_tensors(fn, o) for o in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map_tensors(fn, o) for o in obj)
    if isinstance(obj, dict):
        return type(obj)((k, _map_tensors(fn, v)) for k, v in obj.items())
    return obj


def move_to_device(batch: Any, device: Union[str, torch.device], non_blocking: bool = False) -> Any:
    """``batch`` with every tensor (nested in tuples, lists, namedtuples and dicts) moved to ``device``."""
    device = torch.device(device)
    return _map_tensors(lambda t: t.to(device, non_blocking=non_blocking), batch)


class DevicePrefetcher:
    """Iterate ``loader`` with its batches already on ``device``.

    On CUDA the copy of batch i+1 runs on a side stream (host memory pinned first if the loader did not pin it —
    use ``DataLoader(pin_memory=True)`` to avoid that extra copy), with ``non_blocking=True``, while the model works
    on batch i. Before a batch is handed out the current stream waits for its copy and each tensor is
    ``record_stream``-ed on the current stream, so the caching allocator does not reuse its memory while the
    compute stream still uses it. On any other device it is a plain pass-through (``move_to_device`` per batch).
    """

    def __init__(self, loader: Iterable[Any], device: Union[str, torch.device]) -> None:
        self.loader = loader
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.uses_stream = self.device.type == "cuda"

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[Any]:
        if not self.uses_stream:
            for batch in self.loader:
                yield move_to_device(batch, self.device)
            return
        stream = torch.cuda.Stream(device=self.device)

        def copy(t: Tensor) -> Tensor:
            if t.device.type == "cpu" and not t.is_pinned():
                t = t.pin_memory()
            return t.to(self.device, non_blocking=True)

        def preload(it: Iterator[Any]) -> Any:
            try:
                batch = next(it)
            except StopIteration:
                return _END
            with torch.cuda.stream(stream):
                return _map_tensors(copy, batch)

        it = iter(self.loader)
        nxt = preload(it)
        while nxt is not _END:
            current = torch.cuda.current_stream(self.device)
            current.wait_stream(stream)
            batch = nxt

            _map_tensors(functools.partial(_record, device=self.device, stream=current), batch)
            nxt = preload(it)
            yield batch


_END = object()


def _record(t: Tensor, device: torch.device, stream: torch.cuda.Stream) -> Tensor:
    if t.device == device:
        t.record_stream(stream)
    return t
