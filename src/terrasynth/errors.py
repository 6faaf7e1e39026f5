"""Errors that the command line reports as one clear line."""


class TerrasynthError(Exception):
    """A user-facing error: bad input, missing file, unsupported source.

    The CLI prints ``str(error)`` on one line and exits non-zero, without a traceback.
    """


class InputError(TerrasynthError):
    """The input data is unusable: corrupt, truncated, wrong bands, wrong extent."""


class UnknownModalityError(TerrasynthError):
    """A modality name that is not in the registry."""
