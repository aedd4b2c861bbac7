"""Measuring the censor from outside and inside: scenario runs with real clients (`runner`),
repeated benchmarks with captures (`bench`), their plots, the bypass benchmark, and the Prometheus
exporter the live censor serves."""
