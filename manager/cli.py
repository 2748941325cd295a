"""pyshim: the manager CLI (not implemented yet; see the manager issue)."""

import sys


def main() -> int:
    sys.stderr.write("pyshim: not yet implemented\n")
    return 1


if __name__ == "__main__":
    sys.exit(main())
