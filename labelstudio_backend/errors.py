"""The backend's exceptions, shared by every layer (the server maps them to HTTP statuses).

    BackendError      a request the backend cannot serve as given        -> 400
    ModelUnavailable  the model could not be loaded                      -> 503
    LabelStudioError  Label Studio is unreachable or refused a request   (bulk: exit 2; sync: logged)
    BulkError         a batch job cannot run as asked                    (bulk: exit 2)

ValueErrors raised elsewhere (bad config, region, image) answer 422 with their message.
"""

from __future__ import annotations


class BackendError(ValueError):
    """A request the backend cannot serve as given; the message says why (answered as a 4xx)."""


class ModelUnavailable(RuntimeError):
    """The model could not be loaded (answered as 503 with the reason)."""


class LabelStudioError(RuntimeError):
    """Label Studio could not be reached or refused the request; the message says what to fix.

    status: the HTTP status Label Studio answered, None when it was not reached.
    """

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class BulkError(ValueError):
    """A batch job (bulk, deferred predictions) cannot run as asked; the message says what to change."""
