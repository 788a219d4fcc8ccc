"""``python -m cnnlab``: see `cnnlab.cli.main`."""

from cnnlab.cli.main import main

raise SystemExit(main())
