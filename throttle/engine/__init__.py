"""The censor engine, sans-I/O: packet bytes and `now` in, verdicts out.

`Engine` is the facade; `throttle.engine.core` says how a packet travels through its parts. The
adapters (the NFQUEUE hook, offline classification, metrics) use what is exported here.
"""

from __future__ import annotations

from throttle.engine.buckets import Bucket, Policer, RandomLoss, Shaper, WindowMeter
from throttle.engine.core import Counters, Engine
from throttle.engine.events import (DirectionLimit, EngineError, Event, FlowDecided, FlowEnded, FlowStarted, Limited,
                                    Limits, NameLearned, ResetRequested, Verdict)
from throttle.engine.flows import DIRECTION_NAMES, DOWNLOAD, UPLOAD, Direction, Flow, State

__all__ = [
    "DIRECTION_NAMES", "DOWNLOAD", "UPLOAD", "Bucket", "Counters", "Direction", "DirectionLimit", "Engine",
    "EngineError", "Event", "Flow", "FlowDecided", "FlowEnded", "FlowStarted", "Limited", "Limits", "NameLearned",
    "Policer", "RandomLoss", "ResetRequested", "Shaper", "State", "Verdict", "WindowMeter",
]
