import sys
from pathlib import Path

# The harness and the process helpers live beside these tests.
sys.path.insert(0, str(Path(__file__).resolve().parent))
