"""Errors a user can fix. The CLI prints them as one line and exits 2 (no traceback)."""


class UserError(Exception):
    """Bad input: unknown key, wrong type, missing file, impossible layout, corrupt checkpoint."""


class DistTimeoutError(RuntimeError):
    """A collective did not finish within its phase's timeout; the message names rank and phase."""


# Set by `dist-train launch` for its workers: the directory where each leaves its one-line error, so the
# launcher can report a worker's own words rather than the elastic agent's page of log lines.
ERROR_DIR_ENV = "DIST_TRAIN_ERROR_DIR"

# In a DistTimeoutError's message, the words before which the ranks that never checked in are named;
# the launcher looks for them to report the stuck rank rather than the one it had to kill.
SILENT_PEERS = "did not answer"
