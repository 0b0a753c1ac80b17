"""The one base class of the errors a user can fix: bad settings, missing or corrupt files."""


class UserError(Exception):
    """Raised with a message that names the key or file and the fix. The entry scripts show
    such an error as one line and exit with status 2; any other exception is a bug and keeps
    its traceback."""


class MissingArtifactError(FileNotFoundError):
    """A stage's input artifact is missing or does not fit (another data set, split, size)."""


USER_ERROR_EXIT = 2


def exit_on_user_error(main):
    """Wrap an entry point's task function: a UserError is logged as one line (no traceback)
    and exits with status 2. In a Hydra multirun the error is re-raised instead, so the
    launcher records that job as failed the way it records any other; there a SystemExit with
    a non-zero status (a failure already logged, e.g. by another DDP rank) becomes a JobFailed,
    because Hydra's run_job catches Exception only and a SystemExit would end the whole sweep."""
    import functools
    import logging

    @functools.wraps(main)
    def wrapped(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as error:
            if _multirun():
                raise
            logging.getLogger(main.__module__).error("%s: %s", type(error).__name__, error)
            raise SystemExit(USER_ERROR_EXIT) from None
        except SystemExit as error:
            if error.code in (None, 0) or not _multirun():
                raise
            raise JobFailed(
                f"the job exited with status {error.code}; its log has the error"
            ) from None

    return wrapped


def _multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


class JobFailed(RuntimeError):
    """A sweep job that exited with a non-zero status (see `exit_on_user_error`)."""
