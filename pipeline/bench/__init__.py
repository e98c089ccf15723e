"""Benchmarks run from ``streamvlm bench WHAT``: each prints ratios measured side by side in one run, without Ray."""
