"""Triton kernels, each next to its pure-torch reference (filled by issue 3).

This package imports torch and triton only, so a kernel is usable and testable on its own.
"""
