"""Evaluation and explanation of trained models.

- ``evaluate`` — the step: scores on the test split and on external sets, operating points, CIs.
- ``metrics`` — ROC/PR, thresholds, bootstrap confidence intervals; ``agreement`` — model vs readers.
- ``gradcam`` — the Grad-CAM map; ``explain`` — the step: Grad-CAM examples per outcome.
"""
