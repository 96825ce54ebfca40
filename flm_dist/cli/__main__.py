"""`python -m flm_dist.cli`: the `flm` command without the installed script."""

import sys

from flm_dist.cli.main import main

sys.exit(main())
