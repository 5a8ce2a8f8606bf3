"""The two errors of medrobust-screen: both end the run with a one-line message and exit status 2."""


class BundleError(ValueError):
    """A bundle that cannot be used (one-line reason)."""


class UsageError(BundleError):
    """Bad arguments (a missing input path, a bad --out): one line, exit status 2."""
