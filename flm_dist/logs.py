"""Readable logs for flm_dist only: Ray's and other libraries' INFO chatter stays out."""

import logging


def setup_logging(verbose: bool = False) -> None:
    """Log flm_dist's messages (INFO, or DEBUG with `verbose`) to stderr, once per process."""
    logger = logging.getLogger("flm_dist")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    logger.propagate = False
