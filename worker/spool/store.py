"""The worker's durable spool: the interface, its shape, and the default.

``store()`` returns only once the message, and the directory entry that
finds it, are on disk (fsync, in threads, never on the event loop), so the
SMTP side may answer ``250``. A failed write raises ``SpoolWriteError``
(answer ``451``) and leaves nothing that a later ``load_all()`` would
deliver. Concurrent stores share their syncs (group commit).

``SegmentSpool`` appends messages to a segment file: one write per message
and one fdatasync per batch, a segment deleted once every message in it is
done. One file per message (temp file with O_EXCL, fdatasync, rename into
``active/``, group-committed fsync of the directory), as Postfix and Haraka
do, was measured against it and dropped; a record file found in ``active/``
is still read and moved into the log.

``Spool`` is ``SegmentSpool``, chosen by measurement (loadtest/bench_spool.py,
which ran the file shape too before it was dropped; 2,000 messages of 1 KiB, 64 in flight, on this
host's root filesystem: ext4 without a journal, 2 cores). Three runs, the
steady phase:

    shape                              msgs/s            CPU per message
    file, fsync, one at a time         590-660           1.2-1.4 ms
    file, group commit                 1,010-1,230       1.3-1.6 ms
    file, no fsync at all              1,090-1,170       1.5 ms
    segment, fsync per message         2,350-2,800       0.23-0.27 ms
    segment, group commit              28,000-45,000     0.02-0.03 ms

Making files, not syncing them, is what costs here: creating a file costs
0.1-0.8 ms of kernel CPU on this filesystem (it gets worse after many
deletes), so the file shape tops out near 1,100 msgs/s even with no fsync
at all, and grouping its directory syncs cannot help. It would also take
more CPU than the SMTP side itself, on cores that the SMTP side needs. The
segment log creates a file per 8 MiB, not per message, and its group
commit turns 64 concurrent stores into one fdatasync: about 30 times the
file shape's throughput for about 1/50 of its CPU. At 8 in flight it still
does about 13,000-16,000 msgs/s; with 64 KiB messages about 5,700 (the disk's
bandwidth, not its sync rate).

Waiting a little for a batch to fill (``max_delay``) measured worse at every
concurrency from 1 to 256: keeping one flush in flight already batches
everything that arrives during it. The default is therefore 0, and the knob
stays for disks whose syncs are much faster than their event loop.
"""

from __future__ import annotations

from .segspool import SegmentSpool

Spool = SegmentSpool
