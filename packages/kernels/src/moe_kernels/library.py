"""Definition of the moe_kernels custom ops (torch.library, namespace "moe_kernels").

Each op is defined from a plain Python body, kept in BODIES by op name: moe_kernels.testing runs
the bodies under its dispatch mode to see the aten ops inside, which a mode does not see when it
dispatches the op itself.
"""

from collections.abc import Callable

import torch

NAMESPACE = "moe_kernels"
BODIES: dict[str, Callable] = {}


def define(name: str, body: Callable):
    """The custom op moe_kernels::name running body (no argument mutated)."""
    BODIES[name] = body
    return torch.library.custom_op(f"{NAMESPACE}::{name}", body, mutates_args=())
