"""celery-ordered: run Celery tasks in parallel, consume their results in order."""

from __future__ import annotations

from .aio import AsyncOrderedResultStream
from .compat import ParallelQueue, ParallelSingleTaskQueue
from .embedded import LocalCluster, RedisServer, local_cluster
from .errors import (
    ConfigurationError,
    ConsumerFenced,
    DispatchError,
    OrderedStreamError,
    ProducerFailed,
    RedisUnavailable,
    RemoteTraceback,
    ResultLost,
    StreamClosedError,
    StreamDeleted,
    StreamEmpty,
    StreamExhausted,
    StreamFull,
    StreamNotFound,
    StreamStateLost,
    TaskFailed,
    UnsendableError,
)
from .executor import OrderedExecutor
from .maps import imap, starmap
from .progress import Progress, ProgressBar, progress_bar
from .stream import OrderedResultStream, StreamStats
from .task import OrderedTask, ordered_task

__version__ = "0.1.0"

__all__ = [
    # Streams
    "OrderedResultStream",
    "AsyncOrderedResultStream",
    "StreamStats",
    "imap",
    "starmap",
    "OrderedExecutor",
    # Progress
    "Progress",
    "ProgressBar",
    "progress_bar",
    # The parallel_queue API
    "ParallelQueue",
    "ParallelSingleTaskQueue",
    # Zero-setup default
    "LocalCluster",
    "RedisServer",
    "local_cluster",
    # Tasks
    "OrderedTask",
    "ordered_task",
    # Errors
    "ConfigurationError",
    "ConsumerFenced",
    "DispatchError",
    "OrderedStreamError",
    "ProducerFailed",
    "RedisUnavailable",
    "RemoteTraceback",
    "ResultLost",
    "StreamClosedError",
    "StreamDeleted",
    "StreamEmpty",
    "StreamExhausted",
    "StreamFull",
    "StreamNotFound",
    "StreamStateLost",
    "TaskFailed",
    "UnsendableError",
    # Version
    "__version__",
]
