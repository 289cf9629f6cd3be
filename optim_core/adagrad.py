"""Adagrad (placeholder until implemented)."""

from __future__ import annotations

from .base import Optimizer


class Adagrad(Optimizer):
    """Not implemented yet."""

    def __init__(self, learning_rate=0.001, **kwargs):
        super().__init__(learning_rate=learning_rate, **kwargs)
