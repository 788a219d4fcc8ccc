"""``python -m cnnlab``: see `cnnlab.cli`."""

from cnnlab.cli import main

raise SystemExit(main())
