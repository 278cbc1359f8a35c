"""Inference on new films.

- ``loading`` — find a shipped model, verify it against its card, read its threshold.
- ``predict`` — the ``cxr predict`` step: a folder or files in, a CSV/JSON of probabilities out.
- ``dicom`` — reading DICOM files into model input (pydicom), with one-line errors for odd files.
- ``gradcam`` — the Grad-CAM map of one image; ``export`` — ONNX, SavedModel and LiteRT exports.
"""
