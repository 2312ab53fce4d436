"""The old launcher entry `python -m facevae_dist.train`: say what replaced it rather than exit 0 having trained
nothing."""

import sys

print("python -m facevae_dist.train is gone: launch `python -m facevae_dist train ...` (same arguments)",
      file=sys.stderr)
sys.exit(2)
