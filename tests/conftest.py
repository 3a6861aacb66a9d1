"""Test tiers: unit/ (no process group), fakepg/ (the fake backend, large worlds), torchrun/ (gloo,
2-4 CPU processes; their per-rank programs are torchrun/workers/*). support/ holds the models and
fixtures the tiers share; it is put on sys.path here so every tier imports it by module name.
(Not `dist/`: pytest skips folders named dist or build unless told otherwise.)"""

import sys
from pathlib import Path

SUPPORT = Path(__file__).resolve().parent / "support"
if str(SUPPORT) not in sys.path:
    sys.path.insert(0, str(SUPPORT))
