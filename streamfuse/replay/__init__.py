"""Record streams, replay them through the pipeline in their own namespace, evaluate.

Public API::

    from streamfuse.replay import record, record_demo, replay, compare, Recording

See ``docs/recording-format.md`` for the files a recording is made of.
"""

from streamfuse.replay.compare import compare
from streamfuse.replay.errors import RecordingError, ReplayError
from streamfuse.replay.format import Recording
from streamfuse.replay.recorder import fault_annotations, record, record_demo
from streamfuse.replay.replayer import replay
from streamfuse.replay.summary import decisions

__all__ = ["Recording", "RecordingError", "ReplayError", "compare", "decisions", "fault_annotations", "record",
           "record_demo", "replay"]
