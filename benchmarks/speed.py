"""Speed benchmark (same as `selar bench-speed`): python benchmarks/speed.py --markdown out.md"""
import sys

from selar_local.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench-speed", *sys.argv[1:]]))
