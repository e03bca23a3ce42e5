"""``python -m jaxopt_lab`` runs the command line."""

import sys

from jaxopt_lab.cli import main

sys.exit(main())
