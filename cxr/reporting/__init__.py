"""Reporting: figures and the HTML report.

- ``plots`` — matplotlib figures (class balance, training curves, ROC, confusion, calibration).
- ``report`` — the step: ``reports/report.html`` from the metrics and figures.
"""
