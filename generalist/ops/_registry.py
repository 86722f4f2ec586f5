"""A small registry of named implementations, shared by the ops that have several backends.

An op declares the names it knows (so a typo fails fast) and its implementations register
under those names with a priority and a `unsupported(*inputs) -> str | None` predicate that
says why it cannot serve particular inputs. "auto" picks the highest-priority implementation
that can serve; an explicitly named one that cannot raises instead of silently falling back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

try:
    from torch.utils._python_dispatch import _get_current_dispatch_mode
except ImportError:  # a torch without it: always take the registered op
    _get_current_dispatch_mode = None


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def eager(*inputs: Any) -> bool:
    """True when an op may call its backend directly instead of through its registered
    torch.library op, whose Python dispatch (and, with grad, its autograd wrapper) costs tens of
    microseconds a call, more than a decoding step's kernel: not under torch.compile, no dispatch
    or torch-function mode active (FakeTensorMode, tracing), no torch.func transform, and every
    tensor input a plain torch.Tensor or nn.Parameter (not a subclass such as DTensor) with data
    (not on the meta device, which the op's fake implementation serves). Inputs that are not
    tensors are ignored."""
    if _get_current_dispatch_mode is None or torch.compiler.is_compiling():
        return False
    if _get_current_dispatch_mode() is not None or torch._C._is_torch_function_mode_enabled():
        return False
    if torch._C._functorch.peek_interpreter_stack() is not None:
        return False
    return all(type(t) in _PLAIN and not t.is_meta for t in inputs if isinstance(t, torch.Tensor))


def needs_grad(*inputs: Any) -> bool:
    """Whether a call records an autograd graph: grad mode on and a tensor input requires grad."""
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in inputs)


class BackendError(ValueError):
    """The `backend` argument names an implementation that cannot serve these inputs."""


@dataclass(frozen=True)
class Implementation:
    name: str
    priority: int  # "auto" prefers higher
    unsupported: Callable[..., str | None]  # None when it can serve the inputs, else why not
    functions: dict[str, Callable[..., Any]]  # e.g. {"forward": ..., "backward": ...}


class Registry:
    def __init__(self, op: str, known: tuple[str, ...]):
        self.op = op
        self.known = known
        self._impls: dict[str, Implementation] = {}

    def register(self, impl: Implementation) -> None:
        if impl.name not in self.known:
            raise ValueError(f"{self.op}: unknown backend name {impl.name!r}; known: {self.known}")
        self._impls[impl.name] = impl

    def available(self) -> list[str]:
        return sorted(self._impls, key=lambda n: -self._impls[n].priority)

    def check_name(self, name: str) -> None:
        if name != "auto" and name not in self.known:
            raise BackendError(
                f"{self.op}: unknown backend {name!r}; choose one of {('auto',) + self.known}"
            )

    def call(self, op: Callable[..., Any], function: str, name: str, *inputs: Any,
             autograd: type[torch.autograd.Function] | None = None) -> Any:
        """op(*inputs, name), the registered op; or, in eager mode (`eager(*inputs)`), the resolved
        backend's `function` called on the inputs directly when there is no autograd graph to
        record, and `autograd.apply(implementation, *inputs)` when there is and the op has such a
        torch.autograd.Function (its forward and backward call the backend directly too)."""
        if eager(*inputs):
            if not needs_grad(*inputs):
                return self.resolve(name, *inputs).functions[function](*inputs)
            if autograd is not None:
                return autograd.apply(self.resolve(name, *inputs), *inputs)
        return op(*inputs, name)

    def resolve(self, name: str, *inputs: Any) -> Implementation:
        self.check_name(name)
        if name == "auto":
            reasons = []
            for candidate in self.available():
                impl = self._impls[candidate]
                why = impl.unsupported(*inputs)
                if why is None:
                    return impl
                reasons.append(f"{candidate}: {why}")
            raise BackendError(f"{self.op}: no backend can serve these inputs ({'; '.join(reasons)})")
        impl = self._impls.get(name)
        if impl is None:
            raise BackendError(
                f"{self.op}: backend {name!r} is not available in this installation "
                f"(available: {self.available()})"
            )
        why = impl.unsupported(*inputs)
        if why is not None:
            raise BackendError(f"{self.op}: backend {name!r} cannot serve these inputs: {why}")
        return impl
