"""The one exception of the report: a run's logs cannot give what the report needs."""

from __future__ import annotations


class ReportError(ValueError):
    """The logs of a run are missing, unreadable or hold no noise-scale tags.

    The message is one line: it names the path and says what was expected there, so that the command line can
    print it as is.

    Example::

        >>> from lightning_gns.report import ReportError, read_run
        >>> try:
        ...     read_run("/no/such/run")
        ... except ReportError as err:
        ...     print(err)
        /no/such/run: no such directory; expected a run's log directory (TensorBoard event files or ...)
    """
