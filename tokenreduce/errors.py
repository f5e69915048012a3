"""The one exception type of tokenreduce."""

from __future__ import annotations

__all__ = ["TokenReduceError"]


class TokenReduceError(RuntimeError):
    """A model or request that tokenreduce cannot serve.

    The message names the module path or graph node at fault, the rule that failed, and what to
    do about it. Plain argument errors (a bad type, a ratio out of range) raise ``ValueError`` or
    ``TypeError`` instead.
    """
