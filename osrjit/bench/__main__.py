"""``python -m osrjit.bench``: the suite (the same as ``python -m osrjit bench``)."""
import sys

from .suite import main

sys.exit(main(prog="python -m osrjit.bench"))
