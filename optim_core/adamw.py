"""AdamW: Adam plus the base class's decoupled weight decay, which it requires."""

from __future__ import annotations

from typing import Any

from .adam import Adam


class AdamW(Adam):
    """Adam with ``weight_decay`` (default 0.004) applied as ``w -= w*wd*lr`` before each step."""

    def __init__(
        self, learning_rate: Any = 0.001, weight_decay: Any = 0.004, **kwargs: Any
    ) -> None:
        super().__init__(learning_rate=learning_rate, weight_decay=weight_decay, **kwargs)
        if self.weight_decay is None:
            raise ValueError("Argument `weight_decay` must be a float. Received: weight_decay=None")
