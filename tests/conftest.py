import os
import sys

# the test helpers (parity.py) import as top-level modules
sys.path.insert(0, os.path.dirname(__file__))
