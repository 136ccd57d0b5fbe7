"""``python -m pushctl …`` is ``pushctl …``."""

from pushctl.cli import main

raise SystemExit(main())
