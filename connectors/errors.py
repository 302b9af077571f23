"""The one error type for client input the service refuses (media, request shape); the ingress maps it to 4xx."""

from __future__ import annotations


class ClientInputError(ValueError):
    """``status_code``: the HTTP status; ``code``: a short machine string; ``param``: where in the request."""

    default_status = 400
    default_code = "invalid_request"

    def __init__(self, message: str, *, status_code: int | None = None, code: str | None = None,
                 param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = self.default_status if status_code is None else status_code
        self.code = self.default_code if code is None else code
        self.param = param
