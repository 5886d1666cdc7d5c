"""The archiver's one exception type.

Every failure the archiver can foresee (bad input, an unsafe archive entry, a limit
exceeded) is an ``ArchiveError`` whose message is one line that names the offending
file or entry. The CLI prints that line; the server turns it into an HTTP 400.
"""


class ArchiveError(Exception):
    """An archive could not be built, read or extracted."""
