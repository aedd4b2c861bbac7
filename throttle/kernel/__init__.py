"""Everything that needs root and touches the kernel: entering network namespaces, finding system
tools, the firewall rules, the NFQUEUE adapter and the eBPF fast path. Each is a thin adapter
whose kernel state is created in a context manager that always removes it."""
