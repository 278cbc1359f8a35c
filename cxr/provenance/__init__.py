"""Provenance: which data and code produced which model.

- ``hashing`` — sha256 of files and folder trees (every hand-off between steps is content-checked).
- ``lineage_log`` — the append-only ``lineage/models.jsonl`` log and ``cxr audit``.
- ``versions`` — library and code versions recorded in model cards.
"""
