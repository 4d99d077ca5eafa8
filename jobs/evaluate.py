"""`ray job submit ... -- python jobs/evaluate.py --predictions OUT [--labels L] [--output DIR]`."""

import sys

from raycv.cli import console

if __name__ == "__main__":
    sys.exit(console(["evaluate", *sys.argv[1:]]))
