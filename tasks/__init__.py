"""Prefect tasks: thin wrappers over ``cxr`` functions (caching policy, retries, artifacts)."""
