"""The Redis protocol between web handlers and model workers.

A job is a body under a key of its own, {IMAGE_QUEUE}:job:<id>: one line of JSON (deadline, top_k,
what the answer carries) and then the image, as uploaded (the model worker decodes it) or as raw
uint8 pixels. The IMAGE_QUEUE list holds only each job's entry, "<id>:<bytes of its body>", so
that every step after the enqueue moves a few dozen bytes, not the image: a worker claims entries
by moving them atomically into its own processing list (a job is never in two places, and a worker
that dies leaves its entries where another worker can re-queue them), gets their bodies with one
MGET, and answers each job by pushing its result onto a per-job list that the waiting handler
pops with a blocking call: nobody sleeps on a timer.

Redis 7 hashes every byte of each string a script takes or returns, so no body passes through a
script: bodies are written by plain SETs pipelined before the script that queues their entries,
and read by MGET once claimed. Every script is sent once and then run by its SHA1
(scripts.Script). The client reads replies as bytes: nothing an image passes through is decoded to
text. Deadlines are written and checked on Redis's clock (RedisClock), not on the clocks of the
hosts that write and check them."""
import json
import logging
import time

from serving.errors import ServiceError
from serving.wire.connection import REDIS_ERRORS, WAIT_SLICE_S
from serving.wire.job_format import text, text_hash
from serving.wire.scripts import RoundTrip, Script

log = logging.getLogger(__name__)


# Pushes a request's entries (ARGV[4] on), all or none: none if they would take the queue past
# ARGV[1] jobs or its bodies past ARGV[2] bytes (KEYS[2] counts the bytes of the queued bodies;
# ARGV[3] is the bytes of these). An empty queue takes any request, so one larger than the bound
# is not refused for ever. Checking and pushing in one script keeps the bounds exact with many web
# processes. Returns the depth, negative if full; then the request's bodies (KEYS[3] on), written
# just before on the same connection, are deleted. (A body written before its entry is replicated
# before it: a Redis failover that keeps an entry keeps its body.)
ENQUEUE = Script("""
local depth = redis.call('LLEN', KEYS[1])
local queued = 0
if depth > 0 then queued = tonumber(redis.call('GET', KEYS[2]) or 0) end
local n, size = #ARGV - 3, tonumber(ARGV[3])
if depth > 0 and (depth + n > tonumber(ARGV[1]) or queued + size > tonumber(ARGV[2])) then
  redis.call('DEL', unpack(KEYS, 3))
  return -depth
end
redis.call('SET', KEYS[2], queued + size)
return redis.call('RPUSH', KEYS[1], unpack(ARGV, 4))
""")

# Takes `size` bytes of bodies that leave the queue out of its count; the count goes when the queue
# is empty (an empty queue holds no bytes: a count that drifted heals there).
FORGET_BYTES = """
local function forget_bytes(queue, count, size)
  if redis.call('LLEN', queue) == 0 then
    redis.call('DEL', count)
  elseif size > 0 then
    redis.call('DECRBY', count, size)
  end
end
"""

# Moves up to ARGV[1] entries from the queue into a processing list in one atomic step, so two
# workers can never claim the same job and a claimed job is always somewhere in Redis, and returns
# them, after the entries ARGV[3] on (already moved, by the blocking move that starts a claim).
# Their bytes leave the queue's count. (An entry of the format before this one is the whole job,
# and counts no bytes.) It (re)sets the processing list's expiry: claim_batch's last call is
# always this script.
TAKE = Script(FORGET_BYTES + """
local entries = {unpack(ARGV, 3)}
for i = 1, tonumber(ARGV[1]) do
  local entry = redis.call('LMOVE', KEYS[1], KEYS[2], 'LEFT', 'RIGHT')
  if not entry then break end
  entries[#entries + 1] = entry
end
local taken = 0
for _, entry in ipairs(entries) do
  taken = taken + tonumber(string.match(entry, '^%x+:(%d+)$') or 0)
end
forget_bytes(KEYS[1], KEYS[3], taken)
redis.call('EXPIRE', KEYS[2], ARGV[2])
return entries
""")

# Answers a batch and releases its claims: replaces each result list KEYS[1 + i] by the one result
# ARGV[2 + i] (ARGV[2] of them), kept ARGV[1] seconds, then takes the batch's entries (the rest of
# ARGV) out of the processing list KEYS[1] and deletes their bodies (the rest of KEYS). One
# script: no result is ever left without its expiry, and the waiting handlers wake as it ends.
ANSWER = Script("""
local n = tonumber(ARGV[2])
for i = 1, n do
  redis.call('DEL', KEYS[1 + i])
  redis.call('RPUSH', KEYS[1 + i], ARGV[2 + i])
  redis.call('EXPIRE', KEYS[1 + i], ARGV[1])
end
for i = n + 3, #ARGV do redis.call('LREM', KEYS[1], 1, ARGV[i]) end
for i = n + 2, #KEYS do redis.call('DEL', KEYS[i]) end
""")

# Takes entries (ARGV) off the queue KEYS[1] that no worker has claimed yet, with their bodies
# (KEYS[3] on) and their bytes in the count KEYS[2]; returns how many were there.
WITHDRAW = Script(FORGET_BYTES + """
local removed, freed = 0, 0
for i, entry in ipairs(ARGV) do
  if redis.call('LREM', KEYS[1], 1, entry) > 0 then
    removed = removed + 1
    freed = freed + tonumber(string.match(entry, ':(%d+)$') or 0)
    redis.call('DEL', KEYS[2 + i])
  end
end
forget_bytes(KEYS[1], KEYS[2], freed)
return removed
""")

# Moves a worker's claimed entries (ARGV) from its processing list (KEYS[2]) to the tail of the
# queue (KEYS[1]), their bytes back into the count (KEYS[3]).
REQUEUE = Script("""
local size = 0
for _, entry in ipairs(ARGV) do
  if redis.call('LREM', KEYS[2], 1, entry) > 0 then
    redis.call('RPUSH', KEYS[1], entry)
    size = size + tonumber(string.match(entry, '^%x+:(%d+)$') or 0)
  end
end
if size > 0 then redis.call('INCRBY', KEYS[3], size) end
""")

# Puts a dead worker's claimed entries (KEYS[2]) back at the head of the queue (KEYS[3]), in their
# order, and their bytes back in the count (KEYS[5]). It checks the heartbeat (KEYS[1]) inside the
# script so that a worker which is alive keeps its claim.
REQUEUE_ORPHANS = Script("""
if redis.call('EXISTS', KEYS[1]) == 1 then return -1 end
local moved, size = 0, 0
while true do
  local entry = redis.call('LMOVE', KEYS[2], KEYS[3], 'RIGHT', 'LEFT')
  if not entry then break end
  moved = moved + 1
  size = size + tonumber(string.match(entry, '^%x+:(%d+)$') or 0)
end
if size > 0 then redis.call('INCRBY', KEYS[5], size) end
redis.call('SREM', KEYS[4], ARGV[1])
return moved
""")


# Leaves one entry on the list KEYS[1] for ARGV[1] seconds: the sign that requests came while no
# worker was warm (see wake_workers).
WAKE = Script("""
redis.call('RPUSH', KEYS[1], ARGV[2])
redis.call('LTRIM', KEYS[1], -1, -1)
redis.call('EXPIRE', KEYS[1], ARGV[1])
""")


class QueueFull(Exception):
    """The queue is at MAX_QUEUE_LENGTH or MAX_QUEUE_BYTES; `depth` jobs are waiting."""

    def __init__(self, depth, count=1):
        super().__init__(f"the queue is full ({depth} jobs waiting)" if count == 1 else
                         f"the queue has no room for {count} images ({depth} jobs waiting)")
        self.depth = depth


def queue_depth(redis, keys):
    """Jobs waiting in the queue now."""
    return redis.llen(keys.queue)


def enqueue_jobs(redis, keys, jobs, max_length, max_bytes):
    """Push a request's jobs, all of them or none if the queue is full; returns the queue's length
    with them. One round trip: the bodies' SETs (each lives to its deadline) and the script that
    queues their entries.

    If Redis fails, the reply may have been lost after the push: the jobs are withdrawn (when
    Redis answers again) before the error goes on, so a client told 503 has no job left behind.
    """
    lifetime_ms = int((max(job.deadline for job in jobs) - time.time()) * 1000) + 1000
    script_keys = [keys.queue, keys.queued_bytes, *[keys.job(job.id) for job in jobs]]
    args = [max_length, max_bytes, sum(len(job.body) for job in jobs), *[j.entry for j in jobs]]
    try:
        trip = RoundTrip(redis)
        for job in jobs:
            trip.pipe.set(keys.job(job.id), job.body, px=max(lifetime_ms, 1))
        trip.script(ENQUEUE, script_keys, args)
        depth = trip.execute()[-1]
    except REDIS_ERRORS:
        withdraw_jobs(redis, keys, jobs)
        raise
    if depth <= 0:
        raise QueueFull(-depth, len(jobs))
    return depth


def withdraw_jobs(redis, keys, jobs):
    """Take jobs off the queue that no worker has claimed yet, in one round trip; how many were
    there (0 if Redis cannot be asked)."""
    if not jobs:
        return 0
    try:
        return WITHDRAW(redis, [keys.queue, keys.queued_bytes, *[keys.job(j.id) for j in jobs]],
                        [j.entry for j in jobs])
    except REDIS_ERRORS as exc:
        log.warning("could not withdraw %d jobs (Redis: %s); a worker may still compute them",
                    len(jobs), exc)
        return 0


def wait_for_result(redis, keys, job, deadline):
    """Block until the job's result arrives; at the deadline withdraw the job and raise 504; and
    raise 503 as soon as the job is known to be gone (its body lost in a Redis failover).

    BLMOVE from the result list onto itself reads the result without taking it away, so a read
    whose reply is lost can be repeated. The key is left to expire (RESULT_TTL_S after the worker
    stored it): deleting it would cost every request one more round trip. The wait is cut in
    slices of WAIT_SLICE_S (one call for most requests), and the body is looked for between them:
    it lives until the job is answered (or its deadline).
    """
    key = keys.result(job.id)
    while True:
        timeout = deadline - time.time()
        if timeout <= 0:
            # Past the deadline a result that came meanwhile (e.g. while the handler collected
            # a request's other results) still counts.
            reply = redis.lindex(key, 0)
            break
        # (Redis reads a timeout under 1 ms as 0, "block forever".)
        reply = redis.blmove(key, key, min(max(timeout, 0.01), WAIT_SLICE_S), "LEFT", "RIGHT")
        if reply is not None:
            break
        if not redis.exists(keys.job(job.id)) and deadline - time.time() > 0:
            reply = redis.lindex(key, 0)  # answered just now: the answer deletes the body
            if reply is not None:
                break
            raise ServiceError("the job was lost: Redis failed over before it had copied the "
                               "job to the new master; retry", 503, {"Retry-After": "1"})
    if reply is None:
        # Nobody will wait for this job any more: take it off the queue if no worker has it yet.
        withdraw_jobs(redis, keys, [job])
        raise ServiceError("no result within the request timeout; the model workers are busy "
                           "or not running", 504)
    return json.loads(reply)


# The part of a batch window that claim_batch polls rather than blocks (see there).
FILL_POLL_S = 0.1


def claim_batch(redis, keys, worker_id, batch_size, block_s, claim_ttl_s, time_to_fill):
    """Claim up to batch_size jobs: block up to block_s for the first, then take more for as long
    as time_to_fill(claimed) says more are worth waiting for (it may block; 0: start now).

    Returns (entry, body) pairs (none if no job came within block_s). Their entries stay in this
    worker's processing list until store_results removes them.
    """
    take_keys = [keys.queue, keys.processing(worker_id), keys.queued_bytes]

    def take(count, moved=()):
        return TAKE(redis, take_keys, [count, int(claim_ttl_s), *moved])

    # The first claim of more is sent with the blocking move, in one round trip: Redis runs it as
    # soon as the move is served (a client's commands run in order), so a lone job's worker does
    # not wait for a second reply before it starts. (So it sees the queue as it was then: a job
    # that comes while this worker is slow to read the reply is left to time_to_fill's claims
    # below, or to the next batch.) The first entry is taken with the bodies' read.
    trip = RoundTrip(redis)
    trip.pipe.blmove(keys.queue, take_keys[1], block_s, "LEFT", "RIGHT")
    trip.script(TAKE, take_keys, [batch_size - 1, int(claim_ttl_s)])
    first, batch = trip.execute()
    moved = [first] if first is not None else []
    while batch or moved:
        count = len(batch) + len(moved)
        remaining = time_to_fill(count) if count < batch_size else 0
        if remaining <= 0:
            return with_bodies(redis, keys, batch, moved, take_keys, claim_ttl_s)
        # A push wakes a blocked client at once, but Redis ends a blocking wait that times out
        # only on its clock tick (10 Hz by default): a 5 ms BLMOVE would take 100 ms. So the last
        # 100 ms of a wait are polled every millisecond (a few calls for a typical window).
        # (A timeout under 1 ms must never be sent: Redis reads it as 0, "block forever".)
        if remaining > FILL_POLL_S + 0.01:
            entry = redis.blmove(keys.queue, take_keys[1],
                                 min(remaining - FILL_POLL_S, WAIT_SLICE_S), "LEFT", "RIGHT")
            moved += [entry] if entry is not None else []
        else:
            time.sleep(min(remaining, 0.001))
        batch += take(max(0, batch_size - len(batch) - len(moved)), moved)
        moved = []
    return []


def with_bodies(redis, keys, taken, moved, take_keys, claim_ttl_s):
    """(entry, body) pairs of the entries taken and of those moved but not yet taken (which TAKE
    takes now), in one round trip. An entry of the format before this one has no body (None)."""
    trip = RoundTrip(redis)
    if moved:
        trip.script(TAKE, take_keys, [0, int(claim_ttl_s), *moved])
    entries = taken + moved
    ids = [body_id(entry) for entry in entries]
    body_keys = [keys.job(job_id) for job_id in ids if job_id]
    if body_keys:
        # (As a command: redis-py's Cluster pipelines refuse their mget method.)
        trip.pipe.execute_command("MGET", *body_keys)
    replies = trip.execute() if len(trip.pipe) else []
    bodies = iter(replies[-1] if body_keys else ())
    return [(entry, next(bodies) if job_id else None) for entry, job_id in zip(entries, ids)]


def body_id(entry):
    """The id whose key holds an entry's body; None for an entry of the format before this one
    (the whole job, without a body)."""
    return None if entry.startswith(b"{") else entry.split(b":", 1)[0].decode()


def claimed_jobs(redis, keys, worker_id):
    """Every entry in a worker's processing list (to recover claims whose reply was lost)."""
    return redis.lrange(keys.processing(worker_id), 0, -1)


def take_claimed(redis, keys, worker_id, entries, claim_ttl_s):
    """(entry, body) pairs of entries already in this worker's processing list."""
    return with_bodies(redis, keys, [], list(entries),
                       [keys.queue, keys.processing(worker_id), keys.queued_bytes], claim_ttl_s)


def requeue_jobs(redis, keys, worker_id, entries):
    """Give claimed jobs back to the queue (at its tail), for another worker to take."""
    REQUEUE(redis, [keys.queue, keys.processing(worker_id), keys.queued_bytes], entries)


def store_results(redis, keys, worker_id, results, entries, ttl_s):
    """Answer the jobs of one batch, then release their claims, in one script.

    Only this batch's entries leave the processing list: a worker may hold another batch. Safe to
    repeat when a reply is lost: each result list is replaced, not appended to, and a released
    claim is not found again.
    """
    ids = [job_id for job_id in map(body_id, entries) if job_id]
    ANSWER(redis, [keys.processing(worker_id), *[keys.result(job_id) for job_id in results],
                   *[keys.job(job_id) for job_id in ids]],
           [int(ttl_s), len(results), *[json.dumps(result) for result in results.values()],
            *entries])


def publish_heartbeat(redis, keys, worker_id, fields, ttl_s, registry_ttl_s):
    """Say this worker is alive (and how it is doing) for ttl_s seconds."""
    pipe = redis.pipeline(transaction=True)
    pipe.hset(keys.heartbeat(worker_id), mapping=fields)
    pipe.pexpire(keys.heartbeat(worker_id), int(ttl_s * 1000))
    pipe.sadd(keys.workers, worker_id)
    pipe.expire(keys.workers, int(registry_ttl_s))
    pipe.execute()


def live_workers(redis, keys, again=True):
    """Heartbeats of the workers alive now, as dicts of strings. Read once more if a registered
    worker had none: it may have left between the two reads, its successor registered after the
    first (a hand-over), and this read would show neither."""
    ids = sorted(text(worker_id) for worker_id in redis.smembers(keys.workers))
    pipe = redis.pipeline(transaction=False)
    for worker_id in ids:
        pipe.hgetall(keys.heartbeat(worker_id))
    beats = [text_hash(beat) for beat in pipe.execute() if beat]
    return live_workers(redis, keys, again=False) if again and len(beats) < len(ids) else beats


def wake_workers(redis, keys, ttl_s):
    """Say that a request was refused for want of a warm worker: keys.wake holds one entry (the
    time) for ttl_s seconds, for an autoscaler to start one."""
    WAKE(redis, [keys.wake], [int(ttl_s), int(time.time())])


def requeue_claims(redis, keys, worker_id):
    """Put a silent worker's claimed jobs back on the queue and deregister it; -1 if it beats."""
    return REQUEUE_ORPHANS(redis, [keys.heartbeat(worker_id), keys.processing(worker_id),
                                   keys.queue, keys.workers, keys.queued_bytes], [worker_id])


def requeue_orphans(redis, keys):
    """Re-queue the claimed jobs of every registered worker whose heartbeat has expired."""
    requeued = 0
    for worker_id in map(text, redis.smembers(keys.workers)):
        moved = requeue_claims(redis, keys, worker_id)
        if moved > 0:
            log.warning("re-queued %d jobs of dead worker %s", moved, worker_id)
            requeued += moved
    return requeued


def remove_worker(redis, keys, worker_id):
    """Deregister a worker that is exiting cleanly; anything it still claims goes back first."""
    redis.delete(keys.heartbeat(worker_id))
    requeue_claims(redis, keys, worker_id)
