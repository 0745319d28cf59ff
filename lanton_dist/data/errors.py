"""The error type of data a run cannot use (no torch).

:class:`DataError` is raised for a problem with the *input* itself — an empty corpus, a
file that is not UTF-8, a JSONL line without its text key, token ids the model's vocabulary
cannot hold, a split with no validation documents — with a message that names the file
(and line or byte offset) and what to change. ``launch/train.py`` prints it as one
``data error: …`` line and exits with status 2, as it prints a
:class:`~lanton_dist.config.ConfigError`; ``lanton-dist prepare-data`` the same way (it is a
``ValueError``).
"""
from __future__ import annotations


class DataError(ValueError):
    """Input data a run cannot use; the message names the file and what to change."""
