#!/usr/bin/env python
"""python tools/convert_hf_to_megatron.py --hf-dir DIR --out DIR --tp N [--pp M]"""

import sys

from megatron_prism.models.conversion.cli import hf_to_megatron_main

if __name__ == "__main__":
    sys.exit(hf_to_megatron_main())
