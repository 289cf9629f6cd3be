"""Fused CPU kernels (numba) for hot update rules; each is tested against its xp rule.

Placeholder dispatch: kernels are added by the fused-kernel work; until then nothing fuses.
"""

from __future__ import annotations

from typing import Any


def can_fuse(optimizer: Any, *arrays: Any) -> bool:
    """True when a fused kernel may replace the xp rule for these arrays."""
    return False


def adam(*args: Any) -> None:
    raise NotImplementedError
