"""Errors raised by ingestion when a whole source cannot be used."""


class IngestError(Exception):
    """A source cannot be read at all (missing, unrecognised, or without usable patients)."""
