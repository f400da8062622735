"""The one exception type of :mod:`shortcutfm.data`."""

from __future__ import annotations


class DataError(ValueError):
    """A data set cannot be used as given; the message names the source (file or data set) and the fix."""
