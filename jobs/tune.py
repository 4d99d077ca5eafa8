"""`ray job submit ... -- python jobs/tune.py --config RECIPE [key=value ...]`, or run directly."""

import sys

from raycv.cli import console

if __name__ == "__main__":
    sys.exit(console(["tune", *sys.argv[1:]]))
