"""Errors about a job's whole input, as opposed to one bad row (those become error records).

Entry scripts print an `InputError` as one line on stderr and exit with `EXIT_USAGE`, before any
work starts: a missing manifest, too few rows to train on, an unusable model or output.
"""

from __future__ import annotations

EXIT_USAGE = 2


class InputError(ValueError):
    """A whole-input problem; the message names the file or URI and what to do."""
