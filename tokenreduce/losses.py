"""``tokenreduce.losses``: the fine-tuning losses (defined in :mod:`tokenreduce.train.losses`)."""

from .train.losses import *  # noqa: F401,F403
from .train.losses import __all__  # noqa: F401
