"""Code the tests (and the benchmarks) build on: tiny homologous model families (``families``)."""
