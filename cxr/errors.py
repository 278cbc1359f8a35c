"""User-facing errors: the CLI prints them as one line, without a traceback."""


class CxrError(Exception):
    """A problem the user can fix (bad input, missing credentials, wrong layout).

    The message must be one line that names the problem and the fix.
    """


class DataError(CxrError):
    """The data cannot support the requested step (empty class, bad layout...)."""


class FetchError(CxrError):
    """The data source could not be fetched."""
