"""Errors of the edge runtime.

    RuntimeUserError      base of the errors below: the caller can fix them
      BackendUnavailable  a backend or device asked for is not installed/present; the message
                          lists those that are
      ModelLoadError      a model file could not be loaded by its engine
      RequestError        a prompt or sampling setting is invalid; the message names the field
      GoldenCheckError    a model does not reproduce its bundle's golden continuation

All are user errors: the CLI prints the message and exits with code 2.

    Stopped               not an error: long work (the autotune) given up because its process is stopping
"""


class RuntimeUserError(Exception):
    """An error the caller can act on."""


class BackendUnavailable(RuntimeUserError):
    pass


class ModelLoadError(RuntimeUserError):
    pass


class RequestError(RuntimeUserError):
    pass


class GoldenCheckError(RuntimeUserError):
    pass


class Stopped(Exception):
    """Long work (the autotune's measuring) given up because the process was asked to stop (SIGTERM while the
    agent starts): nothing of it is kept, and the next start does it again."""
