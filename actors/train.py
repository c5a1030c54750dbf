"""`python -m actors.train ...` = `rlpipe train ...`, for `ray job submit --working-dir .` without install."""
import sys

from actors.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
