"""Host names, normalised once before matching: lower case, IDNA, optionally no trailing dot.

Names are normalised when a flow is classified, never per packet: a Unicode name becomes its
xn-- form. Keeping the trailing dot is a model option because the 2021 devices did not strip it,
and `pbs.twimg.com.` evaded them (docs/incidents.md §7). The lab's certificate authority uses the
same function for the names it issues certificates for.
"""

from __future__ import annotations


def normalise(name: str, *, strip_trailing_dot: bool = True) -> str:
    """Lower case, IDNA-encoded, optionally without its trailing dot. Never raises."""
    name = name.strip()
    if strip_trailing_dot:
        name = name.rstrip(".")
    if name.isascii():
        return name.lower()
    try:
        labels = [
            label.encode("idna").decode("ascii") if label else label
            for label in name.lower().split(".")
        ]
        return ".".join(labels)
    except UnicodeError:
        # Not a valid IDNA name: match it as lower-cased text rather than fail the flow.
        return name.lower()
