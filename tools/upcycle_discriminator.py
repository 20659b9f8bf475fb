#!/usr/bin/env python
"""python tools/upcycle_discriminator.py --hf-dir DIR --experts E --topk K --out DIR [--mode routed|dedicated|dense|text-only]"""

import sys

from megatron_prism.models.discriminator.cli import upcycle_main

if __name__ == "__main__":
    sys.exit(upcycle_main())
