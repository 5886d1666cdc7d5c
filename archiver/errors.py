"""The archiver's one exception type.

Every failure the archiver can foresee (bad input, an unsafe archive entry, a limit
exceeded) is an ``ArchiveError`` whose message is one line that names the offending
file or entry. The CLI prints that line; the server turns it into an HTTP 400.
"""


class ArchiveError(Exception):
    """An archive could not be built, read or extracted."""


def one_line(exc: BaseException, limit: int | None = None) -> str:
    """An exception's text squeezed onto one line (torch's errors run to a dozen), cut at ``limit``."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if limit is None or len(text) <= limit else text[: limit - 3] + "..."
