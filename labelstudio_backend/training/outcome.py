"""How a training job ends when it cannot make a better model: a rejection, not a failure.

    raise Rejection("project 3 has 5 annotated tasks; training needs at least 6 ...")

A job that raises a Rejection (too few annotated tasks, no region that can supervise a mask) ends "rejected" with
the reason, logged at INFO without a traceback, like a trained model that is not better; the served model stays.
Any other exception is a failure ("failed", logged with its traceback at ERROR). Light on purpose: the HTTP
side imports it without torch.
"""

from __future__ import annotations


class Rejection(ValueError):
    """The project's data cannot give a better model now: the job's state is "rejected" with this reason."""
