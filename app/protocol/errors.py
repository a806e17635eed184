"""Piston's answer to an invalid request: 400 with Piston's own wording.

The protocol's one error, raised by the parser and the limit checks that the gateway and the
engine share; each program turns it into its own answer (the gateway into its `BadRequest`, the
engine into Piston's 400).
"""

from __future__ import annotations

from typing import ClassVar

__all__ = ["InvalidRequest"]


class InvalidRequest(Exception):
    """A request Piston would refuse; `message` is what Piston says."""

    status_code: ClassVar[int] = 400

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message
