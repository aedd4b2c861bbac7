"""`throttle infer`: from a capture of throttled traffic to the censor that explains it.

`trace` (what a capture says about each flow direction), `reader` (capture file -> traces, as a
stream), `fit` (trace -> the mechanism and its parameters, pure), `scenario_out` (inferences -> a
scenario file), `check` (that scenario run in the lab, inferred again, compared), `plot`.
"""
