"""The command-line tools' logic; ``tools/*.py`` and the ``movq-*`` console scripts call these ``main`` functions."""
