"""The Redis key schema: the only module that spells key names.

Every key starts with the namespace (``MINIRAY_NAMESPACE``, default ``miniray``) so several
clusters can share one server. ``{job}`` is ``<client>.<n>``; ``{chunk}`` is an integer unique
within its job; a queue entry is ``<chunk>:<nframes>:<items>`` (payload frame count, task
count), so scripts can delete payloads and keep counters without unpickling anything. A
``wip:{worker}`` field is ``{job}/{chunk}``, its value the entry tagged with the worker's slot
that holds it, ``<entry>@<slot>`` (so a worker can tell what a dead task process held).

A slot that waits for work registers in ``idle`` as ``{worker}/{slot}``, scored by when it went
idle, and blocks on its own ``wake:{worker}/{slot}`` (for up to MINIRAY_IDLE_WAIT_SECONDS: it
does not wake on a clock; its worker's messages end the wait by a push there, see
``miniray.worker.task.idlewait``). New work wakes the slots that went idle
last (ZPOPMAX): the process that just finished a task takes the next one while its caches are
warm, instead of every idle process taking turns. Work with requirements (GPUs, CPUs, nodes,
Triton) skips the slots of workers whose heartbeat says they can never run it. A lone small
chunk of a job without requirements is handed over whole: its publish does what the slot's
claim would (``wip``, counters, "started") and leaves the claim's reply in
``hand:{worker}/{slot}``, which the slot's wait pops ahead of its wake-ups. A task process on
the client's machine sends a small result message to the client directly (``miniray.values.inbox``),
then completes without it: ``res:{client}`` carries the rest. Large buffers between the client
and task processes on its machine live in ``/dev/shm`` (``miniray.values.shm``): ``tasks:{job}`` and
result messages then carry only their paths (no key of their own; the job spec's ``shm``
names the client's directory).

==========================  ======  ==================  ================  =====================
key                         type    TTL                 written by        read by
==========================  ======  ==================  ================  =====================
fn:{sha}                    string  function TTL,       executor          worker (MGET, once per
                                    renewed while used                    worker and function);
                                                                          rerun_locally (GET)
jobs                        zset    none                executor, claim,  claim script: ready
                                    (members removed)   reaper            jobs by priority
jobs:all                    zset    newest 1000 kept    executor          status: every job;
                                                                          idle stop (persistent)
job:{job}                   hash    grace + 60 s,       executor; claim,  workers, status, the
                                    renewed while open, complete, cancel  notebook (counters)
                                    then result TTL
q:{job}                     list    with job            executor, reaper  claim script (LPOP)
tasks:{job}                 hash    with job            executor          claim script (HMGET),
                                                                          worker (resends)
attempts:{job}              hash    as job:{job}        reaper; complete  reaper, release,
                                                        (partial counts)  complete
stop:{job}                  set     as job:{job}        stop_chunks       heartbeat, complete,
                                                        (executor)        requeue, reaper
wip:{worker}                hash    none                claim script,     complete, reaper,
                                                        publish_one       release (on SIGTERM),
                                                                          idle stop (persistent)
workers                     zset    none (reaped)       heartbeat         reaper, status
worker:{worker}             hash    3x dead timeout     heartbeat;        status, the notebook
                                                        complete
                                                        (tasks_done)
idle                        zset    none (popped;       task processes,   wake-ups (publish,
                                    reaper, release)    GPU slots         claim, requeue)
wake:{worker}/{slot}        list    none (reaper,       wake-ups; that    that slot (BLMPOP)
                                    release)            slot itself (its
                                                        worker spoke)
hand:{worker}/{slot}        list    none (popped;       publish_one       that slot (BLMPOP,
                                    reaper, release,                      ahead of wake:), its
                                    the slot's worker)                    claim
rr                          string  none                claim script      claim (fair share)
clock                       string  none                heartbeat, reap   heartbeat, reap (a gap
                                                                          = a stopped server)
client:{client}             string  client grace,       executor          claim (orphan jobs),
                                    renewed                               idle stop (SCAN, PTTL)
res:{client}                list    client grace        complete, reaper  executor (BLMPOP)
big:{job}:{id}              hash    client grace (an    task process (a   executor (a result:
                                    argument's renewed  result's, before  HGET per part, then
                                    while its chunk     its message);     UNLINK); task process
                                    may run; UNLINK     executor (an      (an argument, HGET
                                    when it ends)       argument's)       per part)
logs:{job}                  stream  as job:{job}        worker            Executor.logs, CLI
out:{job}                   stream  keep grace, renewed complete (a kept  attachers (XREAD),
                                    by its owner; 60 s  job's results)    its owner (XRANGE of
                                    after it collected                    the pointer it got)
idx:{job}                   hash    as out:{job}        executor (kept    attachers (chunk ->
                                                        jobs, at submit)  "start:count")
events:{job}                stream  as job:{job}        all scripts       Executor.events
triton:{server}:lock:{m}    string  load timeout (PX)   miniray.triton    miniray.triton, the
                                                        (SET NX)          worker's Triton thread
triton:{server}:used        hash    none; fields go at  miniray.triton    the worker's Triton
                                    unload, the key     (last use)        thread (stale unload)
                                    when a managed
                                    server starts/stops
cache:{fn}:{arg}            string  cache TTL (from     executor (its     executor (MGET, one
                                    when stored)        cache writer:     per batch of a
                                                        cache_store)      ``cache=True`` map)
cache:index                 zset    none (entries       cache_store,      cache_store (oldest
                                    pruned, evicted)    cache_clear       first), cache_clear
cache:sizes                 hash    none (as index)     cache_store       cache_store
cache:bytes                 string  none                cache_store       cache_store, stats
==========================  ======  ==================  ================  =====================

A ``cache:{fn}:{arg}`` entry is the pickled result of one map item that succeeded: ``{fn}`` is
the function's cache key and ``{arg}`` its argument's (sha256 hex, see ``miniray.cache``).
``cache:index`` scores each entry (``{fn}:{arg}``) by when it was stored, ``cache:sizes`` has
its size in bytes and ``cache:bytes`` their total: the store script evicts the oldest entries
while the total passes ``MINIRAY_CACHE_MAX_BYTES``, and drops those past their TTL.

A ``big:{job}:{id}`` hash is one large out-of-band buffer of an argument or a result that goes
through the server (``miniray.values.bigvalues``): fields ``0``..``n-1`` are its parts, each at most
what the server takes in one value; the chunk's payload or the result message carries only the
key, the size and the part size.

An ``attempts:{job}`` field is a chunk id (its reruns after its worker was lost), or
``d``/``f`` + chunk id: the items of a chunk still running that its holder reported done/failed
(a rerun reports them again: the requeue takes them out of the counters, keeping them as
``sd``/``sf``, counted again only if the lost holder comes back and finishes the chunk).
A ``stop:{job}`` member is a chunk id: a chunk of an open job that its client stopped while a
worker held it (Ctrl-C in a ``map`` while other futures of the executor were pending). Its
items were counted as cancelled then; workers learn of it from their heartbeat's reply and
interrupt it (or drop it unstarted), and what it reports is neither counted nor run again.
A kept job (``Executor(keep=True)``, see ``miniray.client.keep``) has ``keep`` (its grace in
seconds) in ``job:{job}``: the claim does not give it up when its client goes silent; the job's
keys live that long after its client's last renewal. Its results are entries of ``out:{job}`` (field
``p`` per element of the result message) and its client gets ``b"P" job "|" entry id`` in
``res:{client}`` instead; once its client has ``sealed`` it (the field, with ``total`` items),
the scripts set it ``done`` when every item has ended, client or none. An attacher that got
every result of a ``done`` job sets ``collected`` (epoch seconds) in ``job:{job}``. ``idx:{job}``
also holds, for a kept ``map_futures(..., cache=True)`` that found items in the item cache, a
record ``cached:<first task id>`` (JSON: the map's item count, its cached items' cache members
by position, the task ids of the others).
A ``worker:{worker}`` hash has ``info`` (the heartbeat's JSON), ``seen`` and ``tasks_done``
(items the worker finished, counted by the complete script). A ``job:{job}`` hash has its
spec, ``state``, ``created``/``finished`` (epoch seconds) and the item counters ``queued``,
``running``, ``done``, ``failed``, ``cancelled`` (see ``miniray.client.observe``).

``{server}`` names one Triton server (``HOST:PORT`` of its HTTP endpoint, the worker's host for
a loopback one); a ``used`` field is a model name, its value ``"<last use> <stale after>"`` in
seconds (Unix time; stale after 0: never unloaded for disuse).

The persistent cluster's idle stop (``miniray.cluster.service.busy_reasons``) reads
``jobs:all`` and each ``job:{job}``'s ``state``, ``keep`` and ``collected`` (and whether its
``out:{job}`` exists), ``workers`` and each ``wip:{worker}``'s
length, and the PTTL of every ``client:{client}`` (SCAN): a key whose PTTL grew since its
last look was renewed.

Lua scripts (``broker/``) build these names from the namespace with the same spelling; the
functions here are the Python side. Cluster-mode Redis is not supported (scripts touch keys
they compute).
"""

from __future__ import annotations

__all__ = ["Keys"]


class Keys:
    """Key names for one namespace."""

    __slots__ = ("ns",)

    def __init__(self, namespace: str = "miniray"):
        self.ns = namespace

    def fn(self, sha: str) -> str:
        return f"{self.ns}:fn:{sha}"

    @property
    def jobs(self) -> str:
        return f"{self.ns}:jobs"

    @property
    def jobs_all(self) -> str:
        return f"{self.ns}:jobs:all"

    def job(self, job: str) -> str:
        return f"{self.ns}:job:{job}"

    def queue(self, job: str) -> str:
        return f"{self.ns}:q:{job}"

    def tasks(self, job: str) -> str:
        return f"{self.ns}:tasks:{job}"

    def attempts(self, job: str) -> str:
        return f"{self.ns}:attempts:{job}"

    def stop(self, job: str) -> str:
        return f"{self.ns}:stop:{job}"

    def wip(self, worker: str) -> str:
        return f"{self.ns}:wip:{worker}"

    @property
    def workers(self) -> str:
        return f"{self.ns}:workers"

    def worker(self, worker: str) -> str:
        return f"{self.ns}:worker:{worker}"

    @staticmethod
    def waiter(worker: str, slot: int) -> str:
        """A waiting slot's member of ``idle``."""
        return f"{worker}/{slot}"

    @property
    def clock(self) -> str:
        return f"{self.ns}:clock"

    @property
    def idle(self) -> str:
        return f"{self.ns}:idle"

    def wake(self, waiter: str) -> str:
        return f"{self.ns}:wake:{waiter}"

    def hand(self, waiter: str) -> str:
        return f"{self.ns}:hand:{waiter}"

    def client(self, client: str) -> str:
        return f"{self.ns}:client:{client}"

    def results(self, client: str) -> str:
        return f"{self.ns}:res:{client}"

    def logs(self, job: str) -> str:
        return f"{self.ns}:logs:{job}"

    def out(self, job: str) -> str:
        return f"{self.ns}:out:{job}"

    def index(self, job: str) -> str:
        return f"{self.ns}:idx:{job}"

    def events(self, job: str) -> str:
        return f"{self.ns}:events:{job}"

    def triton_lock(self, server: str, model: str) -> str:
        return f"{self.ns}:triton:{server}:lock:{model}"

    def triton_used(self, server: str) -> str:
        return f"{self.ns}:triton:{server}:used"

    def cache(self, fn: str, arg: str) -> str:
        """A cached item result: ``cache:{fn}:{arg}`` (its index member is ``{fn}:{arg}``)."""
        return f"{self.ns}:cache:{fn}:{arg}"

    @property
    def cache_index(self) -> str:
        return f"{self.ns}:cache:index"

    @property
    def cache_sizes(self) -> str:
        return f"{self.ns}:cache:sizes"

    @property
    def cache_bytes(self) -> str:
        return f"{self.ns}:cache:bytes"

    def big(self, job: str, name: str) -> str:
        """A large out-of-band buffer of one of ``job``'s arguments or results, in parts
        (``miniray.values.bigvalues``)."""
        return f"{self.ns}:big:{job}:{name}"

    @staticmethod
    def wip_field(job: str, chunk: int) -> str:
        return f"{job}/{chunk}"

    @staticmethod
    def queue_entry(chunk: int, nframes: int, items: int) -> str:
        return f"{chunk}:{nframes}:{items}"

    @staticmethod
    def parse_entry(entry: str) -> tuple[int, int, int]:
        """``queue_entry``'s inverse: (chunk, nframes, items)."""
        chunk, nframes, items = entry.split(":")
        return int(chunk), int(nframes), int(items)

    @staticmethod
    def payload_field(chunk: int, frame: int) -> str:
        """Field of frame ``frame`` of a chunk's payload in ``tasks:{job}``."""
        return f"{chunk}" if frame == 0 else f"{chunk}.{frame}"
