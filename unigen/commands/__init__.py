"""Subcommands of the ``unigen`` CLI, one module each (see ``unigen/cli.py``)."""
