"""The namespace lab: its topology (client, censor, router, server; `topology.Lab` over `layout`,
`network`, `services`, `client_etc` and `procs`), the lab's services (HTTPS/HTTP server and raw
sink, the HTTP/3 server, dnsmasq), its certificate authority, the QUIC I/O shared by the HTTP/3
server and the QUIC probe's client, and the evasion client that runs inside it."""
