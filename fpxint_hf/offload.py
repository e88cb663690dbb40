"""What accelerate's offload hooks say about a module (read from its ``_hf_hook``; accelerate is never imported)."""

from __future__ import annotations

from typing import Any


def accelerate_hooks(module: Any) -> tuple:
    """The accelerate hooks attached to ``module`` itself (a ``SequentialHook`` unwrapped), possibly none."""
    hook = getattr(module, "_hf_hook", None)
    return () if hook is None else tuple(getattr(hook, "hooks", (hook,)))


def buffers_offloaded(module: Any) -> bool:
    """True when an accelerate hook on ``module`` loads its buffers for each forward (``offload_buffers``)."""
    return any(
        getattr(h, "offload", False) and getattr(h, "offload_buffers", False)
        for h in accelerate_hooks(module)
    )
