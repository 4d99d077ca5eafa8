"""`ray job submit ... -- python jobs/infer.py --checkpoint CKPT --input SRC --output DST [key=value ...]`."""

import sys

from raycv.cli import console

if __name__ == "__main__":
    sys.exit(console(["infer", *sys.argv[1:]]))
