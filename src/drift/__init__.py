"""drift: decoupled multi-turn rollouts and importance-weighted fine-tuning."""

__version__ = "0.1.0"


class DriftError(Exception):
    """An error caused by user input (bad file, bad config, bad model path).

    The CLI prints its message on one line and exits with status 2; no traceback.
    """
