"""Reporting: figures and the HTML report.

- the figures are drawn by ``cxr.common.plots`` (a leaf every step may use).
- ``report`` — the step: ``reports/report.html`` from the metrics and figures.
"""
