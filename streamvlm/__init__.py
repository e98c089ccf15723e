"""The ``streamvlm`` command: a thin layer that parses arguments and calls into the packages."""
