"""``python -m endpoint_proxy``: the same as the ``endpoint-proxy`` command."""

from .cli import main

raise SystemExit(main())
