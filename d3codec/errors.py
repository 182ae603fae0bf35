"""Errors d3codec reports to users. Every one carries a one-line message naming the fix.

`D3Error` is the base; the CLI prints `error: <message>` for it and exits 1, never a traceback.
`D3FormatError` and its subclasses (bad bytes in a `.d3` file) live in `d3codec.format.errors`.
"""


class D3Error(Exception):
    """Base class of every error d3codec raises on purpose for bad input."""


class DatasetError(D3Error):
    """A dataset argument cannot be read: wrong path, broken image, bad labels, ..."""


class BudgetError(D3Error):
    """A byte budget cannot be parsed, or nothing fits in it."""


class ConfigError(D3Error):
    """Settings that contradict each other or the file/dataset they are applied to."""
