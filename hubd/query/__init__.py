"""Extraction: ``conditions`` (what is asked), ``buckets`` (slots and zones), ``energy``, ``execute`` (pages)."""
