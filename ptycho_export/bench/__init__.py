"""The speed benchmark behind ``ptycho-bench`` (:mod:`ptycho_export.bench.speed`), inside the
package so that the installed command works from a wheel; ``bench/`` in the checkout keeps
the other benchmark scripts and every results table."""
