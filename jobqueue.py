"""The Redis protocol between web handlers and model workers.

A job is one JSON string on the IMAGE_QUEUE list. A worker claims jobs by moving them atomically
into its own processing list (so a job is never in two places, and a worker that dies leaves its
jobs where another worker can re-queue them), and answers each job by pushing its result onto a
per-job list that the waiting handler pops with a blocking call: nobody sleeps on a timer.
"""
import json
import logging
import time
import uuid

import redis as redis_py
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.exceptions import RedisClusterException
from redis.retry import Retry
from redis.sentinel import Sentinel

import settings
from helpers import ServiceError, cluster_address, sentinel_address

log = logging.getLogger(__name__)

# Every error Redis or the connection to it can raise: unreachable, but also OOM under maxmemory,
# READONLY after a failover, an ACL denial. Callers answer 503 or back off; none is fatal.
REDIS_ERRORS = (redis_py.RedisError, RedisClusterException)

# No call blocks in Redis longer than this (a handler's wait is cut in such slices), so every reply
# is due within SOCKET_TIMEOUT_S: a Redis that stops answering (a node lost, a partition) is
# noticed in seconds, not at a request's deadline. Each slice costs a waiting handler two round
# trips: under overload, with the queue REQUEST_TIMEOUT_S long, slices of 1 s took a tenth of the
# model's CPU on two cores.
WAIT_SLICE_S = 3.0
SOCKET_TIMEOUT_S = WAIT_SLICE_S + 2


def connect_redis(url=None):
    """A Redis client for REDIS_URL (localhost:6379 when unset) that fails fast and never retries.

    redis-py would re-send a command whose reply was lost, and for a move or a push that queues a
    job twice or strands it. So no command is retried blindly: an outage surfaces at once, the web
    tier answers 503, the worker backs off in its own loop, and each step below is safe to repeat
    or is undone when it fails. Each waiting handler holds a connection, so the pool allows one
    per web connection (redis-py's default is 100). Behind Sentinel, each new connection asks the
    sentinels for the master: after a failover, clients reach the promoted replica by themselves.
    """
    url = url or settings.REDIS_URL or "redis://localhost:6379/0"
    options = dict(decode_responses=True, socket_connect_timeout=2,
                   socket_timeout=SOCKET_TIMEOUT_S, retry=Retry(NoBackoff(), 0),
                   max_connections=settings.WEB_CONNECTIONS + 16)
    if url.startswith("redis+sentinel://"):
        sentinels, master, db, username, password = sentinel_address(url)
        # One try per sentinel (redis-py's default is 10 each), then the next one.
        asking = dict(socket_connect_timeout=1, socket_timeout=1, retry=Retry(NoBackoff(), 0))
        return Sentinel(sentinels, sentinel_kwargs=asking).master_for(
            master, db=db, username=username, password=password, health_check_interval=10,
            **options)
    if url.startswith("redis+cluster://"):
        return connect_cluster(*cluster_address(url), options)
    return redis_py.Redis.from_url(url, health_check_interval=10, **options)


def connect_cluster(nodes, username, password, options, patience_s=60):
    """A Redis Cluster client. It reads the slots' map as it is made, so a cluster that does not
    answer yet is waited for, with growing delays, each logged. MOVED and ASK are followed (the
    command did not run); nothing else is retried. Every key of a queue is in one slot
    (helpers.Keys)."""
    give_up, delay = time.monotonic() + patience_s, 0.1
    while True:
        try:
            return RedisCluster(startup_nodes=[ClusterNode(host, port) for host, port in nodes],
                                username=username, password=password, **options)
        except REDIS_ERRORS as exc:
            if time.monotonic() > give_up:
                raise
            log.warning("Redis Cluster does not answer (%s); again in %.1f s", exc, delay)
            time.sleep(delay)
            delay = min(delay * 2, 5)


# The part of a batch window that claim_batch polls rather than blocks (see there).
FILL_POLL_S = 0.1

# Pushes a request's jobs (ARGV[4] on), all or none: none if they would take the queue past ARGV[1]
# jobs or ARGV[2] bytes (every job of one model has the same size, so length x this job's size is
# the queue's size). An empty queue takes any request, so one larger than the bound is not refused
# for ever. Checking and pushing in one script keeps the bound exact with many web processes.
# Returns the depth, negative if full.
# Each job also gets a marker (KEYS[2] on) living ARGV[3] ms, to its deadline: written with the
# job, in one script, a marker is lost with it when a Redis failover loses the last writes
# (replication is asynchronous). A waiting handler that finds no marker knows its job is gone.
ENQUEUE = """
local depth = redis.call('LLEN', KEYS[1])
local after = depth + #ARGV - 3
if depth > 0 and (after > tonumber(ARGV[1]) or after * string.len(ARGV[4]) > tonumber(ARGV[2])) then
  return -depth
end
for i = 2, #KEYS do redis.call('SET', KEYS[i], 1, 'PX', ARGV[3]) end
return redis.call('RPUSH', KEYS[1], unpack(ARGV, 4))
"""

# Moves up to ARGV[1] jobs from the queue into a processing list in one atomic step, so two
# workers can never claim the same job and a claimed job is always somewhere in Redis. It (re)sets
# the processing list's expiry: claim_batch's last call is always this script.
CLAIM_MORE = """
local claimed = {}
for i = 1, tonumber(ARGV[1]) do
  local job = redis.call('LMOVE', KEYS[1], KEYS[2], 'LEFT', 'RIGHT')
  if not job then break end
  claimed[#claimed + 1] = job
end
redis.call('EXPIRE', KEYS[2], ARGV[2])
return claimed
"""

# Replaces each result list KEYS[i] by the one result ARGV[i + 1], kept ARGV[1] seconds.
STORE_RESULTS = """
for i, key in ipairs(KEYS) do
  redis.call('DEL', key)
  redis.call('RPUSH', key, ARGV[i + 1])
  redis.call('EXPIRE', key, ARGV[1])
end
"""

# Puts a dead worker's claimed jobs back at the head of the queue, in their order. It checks the
# heartbeat inside the script so that a worker which is alive keeps its claim.
REQUEUE_ORPHANS = """
if redis.call('EXISTS', KEYS[1]) == 1 then return -1 end
local moved = 0
while redis.call('LMOVE', KEYS[2], KEYS[3], 'RIGHT', 'LEFT') do moved = moved + 1 end
redis.call('SREM', KEYS[4], ARGV[1])
return moved
"""


def new_job(pixels_b64, shape, deadline, top_k, **outputs):
    """A job record: what a worker needs to classify one image and answer its handler.

    outputs: what the answer carries beyond the top_k predictions (see worker.process_batch):
    probabilities=True, the whole probability vector; classification=K, the top K as the Open
    Inference Protocol's "value:index:label" strings. model=NAME (and version=V): only a worker
    serving that model (at that version) may answer it.
    """
    return {"id": str(uuid.uuid4()), "image": pixels_b64, "shape": list(shape),
            "enqueued_at": time.time(), "deadline": deadline, "top_k": top_k, **outputs}


def job_payload(job):
    """json.dumps(job), its base64 image spliced in unscanned: base64 needs no escaping, and the
    encoder's scan of those 200 kB was a tenth of a request's CPU in the web tier."""
    rest = json.dumps({name: value for name, value in job.items() if name != "image"})
    return f'{rest[:-1]}, "image": "{job["image"]}"}}'


class QueueFull(Exception):
    """The queue is at MAX_QUEUE_LENGTH or MAX_QUEUE_BYTES; `depth` jobs are waiting."""

    def __init__(self, depth, count=1):
        super().__init__(f"the queue is full ({depth} jobs waiting)" if count == 1 else
                         f"the queue has no room for {count} images ({depth} jobs waiting)")
        self.depth = depth


def queue_depth(redis, keys):
    """Jobs waiting in the queue now."""
    return redis.llen(keys.queue)


def enqueue_job(redis, keys, job, max_length, max_bytes):
    """enqueue_jobs for one job: returns its payload and the queue's length with it."""
    payloads, depth = enqueue_jobs(redis, keys, [job], max_length, max_bytes)
    return payloads[0], depth


def enqueue_jobs(redis, keys, jobs, max_length, max_bytes):
    """RPUSH a request's jobs, all of them or none if the queue is full; returns their exact
    payloads (to withdraw them later) and the queue's length with them.

    If Redis fails, the reply may have been lost after the push: the jobs are withdrawn (when
    Redis answers again) before the error goes on, so a client told 503 has no job left behind.
    """
    payloads = [job_payload(job) for job in jobs]
    markers = [keys.job(job["id"]) for job in jobs]
    marker_ms = int((max(job["deadline"] for job in jobs) - time.time()) * 1000) + 1000
    try:
        depth = redis.eval(ENQUEUE, 1 + len(markers), keys.queue, *markers, max_length,
                           max_bytes, max(marker_ms, 1), *payloads)
    except REDIS_ERRORS:
        withdraw_jobs(redis, keys, payloads)
        raise
    if depth <= 0:
        raise QueueFull(-depth, len(jobs))
    return payloads, depth


def withdraw_job(redis, keys, payload):
    """Take a job off the queue if no worker has claimed it yet; True if it was there."""
    return withdraw_jobs(redis, keys, [payload]) == 1


def withdraw_jobs(redis, keys, payloads):
    """Take jobs off the queue that no worker has claimed yet, in one round trip; how many were
    there (0 if Redis cannot be asked)."""
    pipe = redis.pipeline(transaction=False)
    for payload in payloads:
        pipe.lrem(keys.queue, 1, payload)
    try:
        return sum(pipe.execute())
    except REDIS_ERRORS as exc:
        log.warning("could not withdraw %d jobs (Redis: %s); a worker may still compute them",
                    len(payloads), exc)
        return 0


def wait_for_result(redis, keys, job_id, payload, deadline):
    """Block until the job's result arrives; at the deadline withdraw the job and raise 504; and
    raise 503 as soon as the job is known to be gone (its marker lost in a Redis failover).

    BLMOVE from the result list onto itself reads the result without taking it away, so a read
    whose reply is lost can be repeated. The key is left to expire (RESULT_TTL_S after the worker
    stored it): deleting it would cost every request one more round trip. The wait is cut in
    slices of WAIT_SLICE_S (one call for most requests), and the marker is checked between them.
    """
    key = keys.result(job_id)
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
        if not redis.exists(keys.job(job_id)) and deadline - time.time() > 0:
            raise ServiceError("the job was lost: Redis failed over before it had copied the "
                               "job to the new master; retry", 503, {"Retry-After": "1"})
    if reply is None:
        # Nobody will wait for this job any more: take it off the queue if no worker has it yet.
        withdraw_job(redis, keys, payload)
        raise ServiceError("no result within the request timeout; the model workers are busy "
                           "or not running", 504)
    return json.loads(reply)


def claim_batch(redis, keys, worker_id, batch_size, block_s, claim_ttl_s, time_to_fill):
    """Claim up to batch_size jobs: block up to block_s for the first, then take more for as long
    as time_to_fill(claimed) says more are worth waiting for (it may block; 0: start now).

    Returns the claimed payloads (empty if none arrived within block_s). They stay in this worker's
    processing list until store_results removes them.
    """
    processing = keys.processing(worker_id)

    def claim_more(client, count):
        # (execute_command: a cluster's pipeline has a method of its own named eval.)
        return client.execute_command("EVAL", CLAIM_MORE, 2, keys.queue, processing, count,
                                      int(claim_ttl_s))

    # The first claim of more is sent with the blocking move, in one round trip: Redis runs it as
    # soon as the move is served (a client's commands run in order), so a lone job's worker does
    # not wait for a second reply before it starts. (So it sees the queue as it was then: a job
    # that comes while this worker is slow to read the reply is left to time_to_fill's claims
    # below, or to the next batch.)
    pipe = redis.pipeline(transaction=False)
    pipe.blmove(keys.queue, processing, block_s, "LEFT", "RIGHT")
    claim_more(pipe, batch_size - 1)
    first, more = pipe.execute()
    batch = ([first] if first is not None else []) + more
    while batch:
        remaining = time_to_fill(len(batch)) if len(batch) < batch_size else 0
        if remaining <= 0:
            return batch
        # A push wakes a blocked client at once, but Redis ends a blocking wait that times out
        # only on its clock tick (10 Hz by default): a 5 ms BLMOVE would take 100 ms. So the last
        # 100 ms of a wait are polled every millisecond (a few calls for a typical window).
        # (A timeout under 1 ms must never be sent: Redis reads it as 0, "block forever".)
        if remaining > FILL_POLL_S + 0.01:
            job = redis.blmove(keys.queue, processing, min(remaining - FILL_POLL_S, WAIT_SLICE_S),
                               "LEFT", "RIGHT")
            batch += [job] if job is not None else []
        else:
            time.sleep(min(remaining, 0.001))
        batch += claim_more(redis, batch_size - len(batch))
    return batch


def claimed_jobs(redis, keys, worker_id):
    """Every payload in a worker's processing list (to recover claims whose reply was lost)."""
    return redis.lrange(keys.processing(worker_id), 0, -1)


def store_results(redis, keys, worker_id, results, payloads, ttl_s):
    """Answer the jobs of one batch, then release their claims, in one round trip.

    The answers are one script, so no result is ever left without its expiry; the claims follow
    in the same pipeline. Redis runs them in order and wakes each waiting handler as soon as the
    script has run, before it has read the claims' payloads (200 kB an image). Only this batch's
    payloads leave the processing list: a worker may hold another batch. Safe to repeat when a
    reply is lost: each result list is replaced, not appended to, and a released claim is not
    found again. (A worker that dies between the two leaves claims whose jobs are answered: they
    are re-queued and answered once more, or dropped at their deadline.)
    """
    pipe = redis.pipeline(transaction=False)
    if results:
        # (execute_command: a cluster's pipeline has a method of its own named eval.)
        pipe.execute_command("EVAL", STORE_RESULTS, len(results),
                             *[keys.result(job_id) for job_id in results], int(ttl_s),
                             *[json.dumps(result) for result in results.values()])
    for payload in payloads:
        pipe.lrem(keys.processing(worker_id), 1, payload)
    pipe.execute()


def publish_heartbeat(redis, keys, worker_id, fields, ttl_s, registry_ttl_s):
    """Say this worker is alive (and how it is doing) for ttl_s seconds."""
    pipe = redis.pipeline(transaction=True)
    pipe.hset(keys.heartbeat(worker_id), mapping=fields)
    pipe.pexpire(keys.heartbeat(worker_id), int(ttl_s * 1000))
    pipe.sadd(keys.workers, worker_id)
    pipe.expire(keys.workers, int(registry_ttl_s))
    pipe.execute()


def live_workers(redis, keys):
    """Heartbeats of the workers alive now, as dicts of strings."""
    ids = sorted(redis.smembers(keys.workers))
    pipe = redis.pipeline(transaction=False)
    for worker_id in ids:
        pipe.hgetall(keys.heartbeat(worker_id))
    return [beat for beat in pipe.execute() if beat]


def requeue_claims(redis, keys, worker_id):
    """Put a silent worker's claimed jobs back on the queue and deregister it; -1 if it beats."""
    return redis.eval(REQUEUE_ORPHANS, 4, keys.heartbeat(worker_id), keys.processing(worker_id),
                      keys.queue, keys.workers, worker_id)


def requeue_orphans(redis, keys):
    """Re-queue the claimed jobs of every registered worker whose heartbeat has expired."""
    requeued = 0
    for worker_id in redis.smembers(keys.workers):
        moved = requeue_claims(redis, keys, worker_id)
        if moved > 0:
            log.warning("re-queued %d jobs of dead worker %s", moved, worker_id)
            requeued += moved
    return requeued


def remove_worker(redis, keys, worker_id):
    """Deregister a worker that is exiting cleanly; anything it still claims goes back first."""
    redis.delete(keys.heartbeat(worker_id))
    requeue_claims(redis, keys, worker_id)


# --- Model rollouts (rollout.py) ----------------------------------------------------------
# The records are configuration, not request data: they have no TTL (a refusal keeps a day).

HISTORY_LENGTH = 10
REFUSAL_TTL_S = 24 * 3600


def propose_model(redis, keys, spec):
    """Make `spec` the model every worker should serve, under a new rollout number."""
    rollout = redis.incr(keys.model_rollouts)
    pipe = redis.pipeline(transaction=True)
    pipe.delete(keys.model)
    pipe.hset(keys.model, mapping={**spec, "rollout": rollout})
    pipe.execute()
    return rollout


def wanted_model(redis, keys):
    """(spec, rollout number) of the model workers should serve; (None, 0) before any."""
    record = redis.hgetall(keys.model)
    if not record:
        return None, 0
    rollout = int(record.pop("rollout", 0))
    return record, rollout


def restore_model(redis, keys, rollout, spec):
    """Take back rollout number `rollout`: propose `spec` (None: forget the wanted model) unless a
    later rollout has begun meanwhile. Returns the new rollout number, or None if one had."""
    def restore(pipe):
        if wanted_model(pipe, keys)[1] != rollout:
            return None
        new = int(pipe.get(keys.model_rollouts) or 0) + 1 if spec is not None else 0
        pipe.multi()
        pipe.delete(keys.model)
        if spec is not None:
            pipe.set(keys.model_rollouts, new)
            pipe.hset(keys.model, mapping={**spec, "rollout": new})
        return new

    return redis.transaction(restore, keys.model, keys.model_rollouts, value_from_callable=True)


def accepted_models(redis, keys):
    """The accepted model specs, oldest first."""
    return [json.loads(item) for item in redis.lrange(keys.model_history, 0, -1)]


def history_entry(spec):
    return json.dumps(spec, sort_keys=True)


def accept_model(redis, keys, spec):
    """Record `spec` as the newest accepted model (kept: the last HISTORY_LENGTH)."""
    pipe = redis.pipeline(transaction=True)
    pipe.rpush(keys.model_history, history_entry(spec))
    pipe.ltrim(keys.model_history, -HISTORY_LENGTH, -1)
    pipe.execute()


# Pushes ARGV[1] onto KEYS[1] if that list does not exist: checked and pushed in one step.
PUSH_IF_EMPTY = """
if redis.call('EXISTS', KEYS[1]) == 0 then redis.call('RPUSH', KEYS[1], ARGV[1]) end
"""


def accept_first_model(redis, keys, spec):
    """Record `spec` as accepted if nothing is: the version the first worker started with (once,
    however many workers start together)."""
    redis.eval(PUSH_IF_EMPTY, 1, keys.model_history, history_entry(spec))


def forget_newest_model(redis, keys):
    """Drop the newest accepted model (after a rollback to the one before it)."""
    redis.rpop(keys.model_history)


def refuse_model(redis, keys, rollout, worker, reason):
    """Record that `worker` refused rollout number `rollout`, and why."""
    pipe = redis.pipeline(transaction=True)
    pipe.hset(keys.refusals(rollout), worker, reason)
    pipe.expire(keys.refusals(rollout), REFUSAL_TTL_S)
    pipe.execute()


def refusals(redis, keys, rollout):
    """{worker: reason} of the workers that refused rollout number `rollout`."""
    return redis.hgetall(keys.refusals(rollout))
