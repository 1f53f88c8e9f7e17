"""``python -m detc.compiler.cli`` runs the ``detc`` command."""

from __future__ import annotations

import sys

from detc.compiler.cli.app import main

sys.exit(main())
