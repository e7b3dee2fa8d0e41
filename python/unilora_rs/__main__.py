"""``python -m unilora_rs``: the ``unilora`` command line."""

from .cli import main

raise SystemExit(main())
