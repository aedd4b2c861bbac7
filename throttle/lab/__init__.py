"""The namespace lab: its topology (client, censor, server), the lab's services (HTTPS/HTTP server,
raw sink, dnsmasq), its certificate authority, and the evasion client that runs inside it."""
