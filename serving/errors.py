"""The service's error: a message and the HTTP status it is answered with."""


class ServiceError(Exception):
    """A request refused or unfinished: `message` goes to the client with HTTP `status`."""

    def __init__(self, message, status=400, headers=None, body=None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.headers = headers or {}
        self.body = body or {}  # more fields of the error's JSON body
