"""ptycho-bench: throughput, latency and memory of every runtime on the same inputs.

See bench/README.md. Not shipped in the wheel: run it from a checkout (``ptycho-bench``
finds this folder next to ``cli/``).
"""
