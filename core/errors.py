"""The one exception type a user can cause; the CLI prints its message as one line."""


class UserError(Exception):
    """Bad input or a bad request: the message is one sentence for the user, never a traceback."""


def os_error_message(err: OSError) -> str:
    """One line for an OSError on a user's path: `PATH: Read-only file system`.

    A read-only or full disk, a missing permission or a folder where a file is expected
    is the user's to fix, not a bug; h5py reports its own I/O failures as OSError too.
    """
    text = err.strerror or " ".join(str(err).split()) or type(err).__name__
    where = [str(p) for p in (err.filename, err.filename2) if p not in (None, "")]
    return f"{' -> '.join(where)}: {text}" if where else text
