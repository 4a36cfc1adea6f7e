"""Ingest processing: parse hostile email, extract indicators, sanitize HTML."""
