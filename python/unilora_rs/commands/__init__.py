"""Sub-commands of the ``unilora`` command line, one module each (discovered by cli.py)."""
