"""``python -m client``: the command-line client, the same as the ``instance-detector`` command."""

import sys

from client.cli import main

sys.exit(main())
