"""Evaluation and explanation of trained models.

- ``evaluate`` — the step: scores on the test split and on external sets, operating points, CIs.
- ``set_roles`` — which set chooses and which reports; ``curves`` — the DVC plot tables.
- ``agreement`` — model vs readers; ``explain`` — the step: Grad-CAM examples per outcome.
- ``promotion`` — the step: does a retrained model replace the shipped one.

The metrics and the threshold rules live in ``cxr.common``; the Grad-CAM map in ``cxr.inference``.
"""
