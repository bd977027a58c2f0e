"""Plots and a report from a run's logs: ``lightning-gns report RUN_DIR``, or :func:`make_report` from Python.

=================  ============================================================================================
module             what
=================  ============================================================================================
``reading``        find a run's TensorBoard event files or CSVLogger ``metrics.csv``; one table of series
``summary``        the numbers the report states (suggestion, horizon, skipped steps, lr rule, trade-off)
``figures``        the PNGs, drawn with matplotlib's Agg canvas (the ``report`` extra)
``render``         ``report.md`` and a self-contained ``report.html``
``build``          :func:`make_report`, the three above in order
``command``        the ``report`` sub-command of the ``lightning-gns`` command line
=================  ============================================================================================

Reading needs only TensorBoard and NumPy; matplotlib is imported when the figures are drawn.
"""

from lightning_gns.report.build import make_report
from lightning_gns.report.errors import ReportError
from lightning_gns.report.reading import RunLog, Series, read_run
from lightning_gns.report.summary import RunSummary, summarize

__all__ = ["ReportError", "RunLog", "RunSummary", "Series", "make_report", "read_run", "summarize"]
