"""Errors a user's input caused, said in one line and exit 2 by the command line. Light to import: the
command line catches them before it has imported Beam or the models."""

from __future__ import annotations


class QueryError(ValueError):
    """A query that cannot be answered, said in one line."""
