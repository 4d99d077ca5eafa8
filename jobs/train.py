"""`ray job submit ... -- python jobs/train.py [--config FILE] [key=value ...]`, or run directly."""

import sys

from raycv.cli import console

if __name__ == "__main__":
    sys.exit(console(["train", *sys.argv[1:]]))
