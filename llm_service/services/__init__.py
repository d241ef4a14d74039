"""Prompt services: manifests with their templates, and the chunking of inputs longer than a context."""
