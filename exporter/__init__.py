"""quantgate exporter: source reading, recipes, calibration, numerics and the streaming weight pass."""

from __future__ import annotations

import os

# OpenMP threads that finish a parallel region sleep instead of spinning (set before torch loads;
# an explicit OMP_WAIT_POLICY wins). On a shared or oversubscribed CPU, spinning threads steal the
# cores the working ones need: the CPU calibration of the 36M Gemma4 MoE took 19.8 s with spinning
# and 11.1 s passive on the 2-core box at load 3.5. Big matmuls never notice the wake-up latency.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
