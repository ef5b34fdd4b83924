"""A worker's line to the coordinator, one job per module.

- :mod:`~worker.link.line`: the two sockets and the messages that cross them;
- :mod:`~worker.link.snapshots`: configuration snapshots in;
- :mod:`~worker.link.rings`: ring epochs in, applied to the counter node in order;
- :mod:`~worker.link.heartbeat`: the report every second (metrics, phase, versions held);
- :mod:`~worker.link.admin`: the coordinator's questions to this worker, answered.

worker/lifecycle.py runs them through a worker's life.
"""
