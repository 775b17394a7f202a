"""Write a forced-class checkpoint for trying the service where the real weights cannot be had.

    python -m testkit.make_checkpoint /tmp/kite.pt kite

The file is the real maskrcnn_resnet50_fpn architecture with seeded weights that answer exactly
``[CATEGORY]`` for any image: it proves the plumbing, not detection quality.
"""

import sys

from testkit.checkpoints import make_forced_checkpoint

if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    print(f"sha256 {make_forced_checkpoint(sys.argv[1], sys.argv[2])}  {sys.argv[1]}")
