"""Backend tables: several kernels can serve one op; the first one that accepts the input runs.

Each op keeps an ordered table of backends. A backend says whether it is usable at all (`available`: was its
kernel built, is its compiler importable) and whether it accepts a given input (`supports`: device, dtype, ...);
both answer None for yes or a short reason for no. A backend may also `defer` an input it accepts to the next
accepting kernel (measured faster on such inputs; never to the reference); forcing it still runs it.
`MLTK_BACKEND=<name>` or `with mltoolkit.backend("<name>"):` forces one backend; when the forced one refuses, the
error lists every backend of the op and its reason.
The choice is made when an op runs, so compiled graphs honour it too; enter the block outside the compiled
function (torch.compile cannot trace ContextVar changes).
"""
from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Optional

Reason = Optional[str]  # None means "yes"

BACKEND_NAMES = ("cuda", "triton", "cpp", "reference")

_forced: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("mltoolkit_backend", default=None)


# Every op call reads MLTK_BACKEND (so setting it at run time works). os.environ.get costs ~0.5 us, mostly
# encoding the key and raising KeyError when it is unset; CPython's os.environ keeps its values in the dict
# `_data` under encoded keys, read here directly where it exists.
_ENV_DATA = getattr(os.environ, "_data", None)
_ENV_KEY = os.environ.encodekey("MLTK_BACKEND") if isinstance(_ENV_DATA, dict) else None


def _env_backend() -> Optional[str]:
    if _ENV_KEY is None:
        return os.environ.get("MLTK_BACKEND") or None
    raw = _ENV_DATA.get(_ENV_KEY)
    return os.environ.decodevalue(raw) or None if raw is not None else None


def forced_backend() -> Optional[str]:
    """The backend forced by `mltoolkit.backend(...)` (innermost wins) or, failing that, by MLTK_BACKEND."""
    inner = _forced.get()
    if inner is None:
        return _env_backend()
    return inner or None


@contextlib.contextmanager
def backend(name: Optional[str]) -> Iterator[None]:
    """Force one backend for the ops called inside the block (None lifts an outer choice and MLTK_BACKEND too)."""
    if name is not None and name not in BACKEND_NAMES:
        raise ValueError(f"mltoolkit.backend: unknown backend {name!r}; choose one of {', '.join(BACKEND_NAMES)}")
    token = _forced.set(name if name is not None else "")
    try:
        yield
    finally:
        _forced.reset(token)


class NoBackendError(RuntimeError):
    """No backend of an op accepts the input (or the forced one refuses it)."""


@dataclass
class Backend:
    name: str
    kernels: dict[str, Callable[..., Any]]
    supports: Callable[..., Reason]
    available: Callable[[], Reason] = lambda: None
    defer: Callable[..., Reason] = lambda *_: None

    def reason(self, *args: Any) -> Reason:
        why = self.available()
        return why if why is not None else self.supports(*args)


@dataclass
class BackendTable:
    """The ordered backends of one op family; `select(*inputs)` returns the backend that runs."""

    op: str
    backends: list[Backend] = field(default_factory=list)

    def register(self, name: str, supports: Callable[..., Reason], available: Callable[[], Reason] = lambda: None,
                 defer: Callable[..., Reason] = lambda *_: None, **kernels: Callable[..., Any]) -> None:
        if name not in BACKEND_NAMES:
            raise ValueError(f"{self.op}: backend name {name!r} is not one of {BACKEND_NAMES}")
        self.backends.append(Backend(name, kernels, supports, available, defer))

    def get(self, name: str) -> Optional[Backend]:
        return next((b for b in self.backends if b.name == name), None)

    def reasons(self, *args: Any) -> dict[str, Reason]:
        return {b.name: b.reason(*args) for b in self.backends}

    def select(self, *args: Any) -> Backend:
        name = forced_backend()
        if name:
            chosen = self.get(name)
            why = chosen.reason(*args) if chosen else f"{self.op} has no {name!r} backend"
            if why is None:
                return chosen
            raise NoBackendError(f"{self.op}: forced backend {name!r} refused: {why}.\n" + self._explain(*args))
        # Asked lazily, in order (this runs on every op call): the first accepting backend, unless it defers and a
        # later kernel accepts (a backend never defers to the plain-PyTorch reference).
        chosen = None
        for b in self.backends:
            if b.available() is not None or b.supports(*args) is not None:
                continue
            if chosen is not None and b.name == "reference":
                break
            chosen = b
            if b.defer(*args) is None:
                break
        if chosen is None:
            raise NoBackendError(f"{self.op}: no backend accepts this input.\n" + self._explain(*args))
        return chosen

    def _explain(self, *args: Any) -> str:
        def status(b: Backend) -> str:
            why = b.reason(*args)
            deferred = b.defer(*args) if why is None else None
            return why or (f"accepts, defers when not forced: {deferred}" if deferred else "accepts")

        return "\n".join(f"  {b.name}: {status(b)}" for b in self.backends)


_TABLES: dict[str, BackendTable] = {}


def table(op: str) -> BackendTable:
    """The backend table of `op`, created on first use."""
    return _TABLES.setdefault(op, BackendTable(op))


def all_tables() -> dict[str, BackendTable]:
    return dict(_TABLES)
