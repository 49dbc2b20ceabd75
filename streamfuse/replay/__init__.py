"""Record streams, replay them through the pipeline in their own namespace, evaluate.

Public API::

    from streamfuse.replay import record, record_demo, replay, ReplayOptions, compare, Recording

    summary = replay("rec/fog", settings, ReplayOptions(report_dir="out/fog", speed=10.0))

See ``docs/recording-format.md`` for the files a recording is made of.
"""

from streamfuse.replay.compare import compare
from streamfuse.replay.errors import RecordingError, ReplayError
from streamfuse.replay.format import Recording
from streamfuse.replay.options import ReplayOptions
from streamfuse.replay.recorder import fault_annotations, record, record_demo
from streamfuse.replay.replayer import replay
from streamfuse.replay.summary import decisions

__all__ = ["Recording", "RecordingError", "ReplayError", "ReplayOptions", "compare", "decisions", "fault_annotations",
           "record", "record_demo", "replay"]
