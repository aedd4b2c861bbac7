"""Bytes on the wire: the one IP/TCP/UDP decoder (`ip`), the TLS ClientHello, QUIC client Initial,
HTTP request and DNS response parsers, host name normalisation, and capture files. Pure: no I/O but
reading a capture, and nothing here imports the rest of throttle (beyond `throttle.errors`)."""
