"""The command-line tools' logic; ``tools/*.py`` and the ``movq-*`` console scripts call these ``main`` functions."""
import logging

from movq.utils import launcher_rank


def setup_logging() -> None:
    """The tools' logging: INFO on rank 0, WARNING on the other ranks (the launcher's RANK), Accelerate's
    one line per saved file kept quiet."""
    logging.basicConfig(level=logging.INFO if launcher_rank() == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("accelerate.checkpointing", "accelerate.accelerator"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
