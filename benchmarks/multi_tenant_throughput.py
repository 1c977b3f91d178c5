#!/usr/bin/env python
"""Multi-tenant throughput, bare vs PEDRO vs multi-LoRA: the code ships in the package
(`vllm_pedro/tools/bench.py`, also `vllm-pedro bench`); this script is its entry point
from a source checkout. `--help` lists the options."""

import sys

from vllm_pedro.tools.bench import main

if __name__ == "__main__":
    sys.exit(main())
