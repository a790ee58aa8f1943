"""``python -m osrjit.bench``: the suite (the same as ``python -m osrjit bench``)."""
import sys

from .suite import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m osrjit.bench"))
