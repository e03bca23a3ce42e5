"""``python -m jaxopt_lab`` runs the command line."""

import sys

from jaxopt_lab.app.cli import main

if __name__ == "__main__":  # importing the module (docs, tools) must not run the command
    sys.exit(main())
