"""Definition of the moe_kernels custom ops (torch.library, namespace "moe_kernels").

Each op is defined from a plain Python body, kept in BODIES by op name: moe_kernels.testing runs
the bodies under its dispatch mode to see the aten ops inside, which a mode does not see when it
dispatches the op itself.

The ops are defined on a torch.library.Library with the body as their CompositeExplicitAutograd
kernel rather than by torch.library.custom_op, whose kernel wrapper imports torch._dynamo (and
sympy) on an op's first call: seconds of start-up and about 170 MiB of memory for every eager
program, compiled or not.
"""

from collections.abc import Callable

import torch

NAMESPACE = "moe_kernels"
BODIES: dict[str, Callable] = {}
_LIBRARY = torch.library.Library(NAMESPACE, "FRAGMENT")


def define(name: str, body: Callable) -> torch._ops.OpOverload:
    """The custom op moe_kernels::name running body (no argument mutated)."""
    BODIES[name] = body
    _LIBRARY.define(name + torch.library.infer_schema(body, mutates_args=()))
    _LIBRARY.impl(name, body, "CompositeExplicitAutograd")
    return getattr(getattr(torch.ops, NAMESPACE), name).default


def register_fake(op: torch._ops.OpOverload) -> Callable:
    """Decorator: the fake (meta) implementation of op, for tracing."""

    def register(fn: Callable) -> Callable:
        torch.library.register_fake(op, fn, lib=_LIBRARY)
        return fn

    return register


def register_autograd(op: torch._ops.OpOverload, backward: Callable, setup_context: Callable):
    torch.library.register_autograd(op, backward, setup_context=setup_context, lib=_LIBRARY)
