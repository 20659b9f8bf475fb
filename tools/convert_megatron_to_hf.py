#!/usr/bin/env python
"""python tools/convert_megatron_to_hf.py --megatron-dir DIR --out DIR"""

import sys

from megatron_prism.models.conversion.cli import megatron_to_hf_main

if __name__ == "__main__":
    sys.exit(megatron_to_hf_main())
