"""Provenance: which data and code produced which model.

- ``hashing`` — sha256 of files and folder trees (every hand-off between steps is content-checked).
- ``lineage_log`` — the append-only ``lineage/models.jsonl`` log and ``cxr audit``.
- ``versions`` — library and code versions recorded in model cards.
- ``code_closure`` — each step's code fingerprint (comments, docstrings and messages ignored).
- ``model_store`` — every trained version kept by content, for promotion and rollback.
"""
