"""pyshimd: the manager daemon (not implemented yet; see the manager issue)."""

import sys


def main() -> int:
    sys.stderr.write("pyshimd: not yet implemented\n")
    return 1


if __name__ == "__main__":
    sys.exit(main())
