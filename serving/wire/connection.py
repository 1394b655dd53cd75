"""Connecting to Redis (one server, Sentinel or Cluster) as the service's ACL users, and Redis's
clock."""
import logging
import time

import redis as redis_py
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.exceptions import NoPermissionError, RedisClusterException
from redis.retry import Retry
from redis.sentinel import Sentinel

import settings
from serving.redis_urls import cluster_address, sentinel_address

log = logging.getLogger(__name__)

# Every error Redis or the connection to it can raise: unreachable, but also OOM under maxmemory,
# READONLY after a failover, an ACL denial. Callers answer 503 or back off; none is fatal.
REDIS_ERRORS = (redis_py.RedisError, RedisClusterException)

# No call blocks in Redis longer than this (a handler's wait is cut in such slices), so every reply
# is due within SOCKET_TIMEOUT_S: a Redis that stops answering (a node lost, a partition) is
# noticed in seconds, not at a request's deadline. Each slice costs a waiting handler two round
# trips, so slices are not shorter than they need to be.
WAIT_SLICE_S = 3.0
SOCKET_TIMEOUT_S = WAIT_SLICE_S + 2


def connect_redis(url=None, patience_s=60):
    """A Redis client for REDIS_URL (localhost:6379 when unset), as REDIS_USERNAME with
    REDIS_PASSWORD where the URL names no user, that fails fast and never retries. (A Cluster
    client needs the cluster as it is made: it waits up to patience_s for it, None: for ever.)

    redis-py would re-send a command whose reply was lost, and for a move or a push that queues a
    job twice or strands it. So no command is retried blindly: an outage surfaces at once, the web
    tier answers 503, the worker backs off in its own loop, and each step below is safe to repeat
    or is undone when it fails. Each waiting handler holds a connection, so the pool allows one
    per web connection (redis-py's default is 100). Behind Sentinel, each new connection asks the
    sentinels for the master: after a failover, clients reach the promoted replica by themselves.
    """
    url = url or settings.REDIS_URL or "redis://localhost:6379/0"
    login = {"username": settings.REDIS_USERNAME or None,
             "password": settings.REDIS_PASSWORD or None}
    options = dict(decode_responses=False, socket_connect_timeout=2,
                   socket_timeout=SOCKET_TIMEOUT_S, retry=Retry(NoBackoff(), 0),
                   max_connections=settings.WEB_CONNECTIONS + 16)
    if url.startswith("redis+sentinel://"):
        sentinels, master, db, username, password = sentinel_address(url)
        # One try per sentinel (redis-py's default is 10 each), then the next one.
        asking = dict(socket_connect_timeout=1, socket_timeout=1, retry=Retry(NoBackoff(), 0))
        return Sentinel(sentinels, sentinel_kwargs=asking).master_for(
            master, db=db, username=username or login["username"],
            password=password or login["password"], health_check_interval=10, **options)
    if url.startswith("redis+cluster://"):
        nodes, username, password = cluster_address(url)
        return connect_cluster(nodes, username or login["username"],
                               password or login["password"], options, patience_s)
    return redis_py.Redis.from_url(url, health_check_interval=10, **login, **options)


def check_login(patience_s=60):
    """Stop this process (SystemExit, saying why) if Redis refuses its login, or its user may not
    read the queue: a wrong password is fixed by an operator, not by waiting. Redis not answering
    (yet) is left to the caller, which waits for it in its own way."""
    user = settings.REDIS_USERNAME or "default"
    try:
        connect_redis(patience_s=patience_s).llen(settings.IMAGE_QUEUE)
    except (redis_py.AuthenticationError, NoPermissionError) as exc:
        raise SystemExit(f"Redis refuses user {user!r}: {exc} (check REDIS_USERNAME and "
                         "REDIS_PASSWORD)") from None
    except REDIS_ERRORS as exc:
        log.warning("Redis does not answer yet (%s: %s)", type(exc).__name__, exc)


def connect_cluster(nodes, username, password, options, patience_s=60):
    """A Redis Cluster client. It reads the slots' map as it is made, so a cluster that does not
    answer yet is waited for, with growing delays, each logged. MOVED and ASK are followed (the
    command did not run); nothing else is retried. Every key of a queue is in one slot
    (serving.wire.keys)."""
    give_up = time.monotonic() + (float("inf") if patience_s is None else patience_s)
    delay = 0.1
    while True:
        try:
            return RedisCluster(startup_nodes=[ClusterNode(host, port) for host, port in nodes],
                                username=username, password=password, **options)
        except redis_py.AuthenticationError:
            raise
        except REDIS_ERRORS as exc:
            if time.monotonic() > give_up:
                raise
            log.warning("Redis Cluster does not answer (%s); again in %.1f s", exc, delay)
            time.sleep(delay)
            delay = min(delay * 2, 5)


class RedisClock:
    """Redis's clock as this process reads it: time.time() plus the offset last measured with
    TIME. A job's deadline is set by a web process and checked by a model worker, often on another
    host: both count it on this clock, so a host whose clock is off neither drops jobs that still
    have time nor works on jobs whose clients have gone."""

    WARN_S = 1.0  # an offset beyond this is logged (the host's clock wants NTP)
    MAX_ROUND_TRIP_S = 0.5  # a slower TIME tells too little: the offset measured before stays

    def __init__(self):
        self.offset = 0.0  # Redis's clock minus this host's, in seconds
        self.skewed = False

    def measure(self, redis):
        """Measure the offset again (TIME, taken half-way through its round trip); returns it.
        Logs a warning when it grows beyond WARN_S (and when it is back within)."""
        before = time.time()
        seconds, micros = redis.time()
        after = time.time()
        if after - before < self.MAX_ROUND_TRIP_S:
            self.offset = seconds + micros / 1e6 - (before + after) / 2
        if (abs(self.offset) > self.WARN_S) != self.skewed:
            self.skewed = not self.skewed
            (log.warning if self.skewed else log.info)(
                "this host's clock is %.3f s %s Redis's%s", abs(self.offset),
                "behind" if self.offset > 0 else "ahead of",
                ": deadlines are counted on Redis's clock, but the host's wants NTP"
                if self.skewed else "")
        return self.offset

    def now(self):
        """Seconds since the epoch on Redis's clock."""
        return time.time() + self.offset


CLOCK = RedisClock()  # this process's reading of Redis's clock


# The Redis users of a deployment (docker-compose.yml, deploy/k8s), each with only the commands its
# tier sends, its scripts' included (Redis checks a script's calls against its caller's user), on
# only the keys of its queue that it uses. The web tier, the one facing the internet, can neither
# propose a model nor forge a heartbeat; KEDA reads the lengths of the queue and of its wake list
# (Keys.wake); `admin` is for operators. Each user's password is REDIS_<USER>_PASSWORD where the
# deployment starts Redis. A client that gives no password gets the default user, which may only
# PING (health checks).
REDIS_USERS = {
    "web": "eval evalsha llen rpush lrem ltrim get set del incrby decrby exists expire blmove "
           "lindex smembers hgetall time ping",
    "model": "eval evalsha llen lmove blmove rpush rpop lrem lrange lindex ltrim get mget set del "
             "incr incrby decrby exists expire pexpire hset hgetall sadd srem smembers multi exec "
             "watch unwatch time ping info",
    "keda": "eval type llen ping",
}


def acl_rules(user, queue):
    """The ACL rules of one of REDIS_USERS (without its password): its commands, and the keys of
    `queue` it may read (%R~) or read and write (%RW~ or ~), as redis-server's `user` directive
    and ACL SETUSER take them."""
    name = "".join(f"\\{c}" if c in "*?[]\\" else c for c in queue)  # a glob matching the name
    tag = f"{{{name}}}"
    keys = {"web": [f"%RW~{name}", f"%RW~{tag}:queued_bytes", f"%RW~{tag}:job:*",
                    f"%RW~{tag}:result:*", f"%R~{tag}:workers", f"%R~{tag}:worker:*",
                    f"%RW~{tag}:wake"],
            "model": [f"~{name}", f"~{tag}:*"],
            # KEDA reads the lengths by EVAL, whose keys need both rights (its commands: reads).
            "keda": [f"~{name}", f"~{tag}:wake"]}[user]
    return ["resetkeys", *keys, "resetchannels", "-@all", "+@connection", "-@dangerous",
            *(f"+{command}" for command in REDIS_USERS[user].split())]


def redis_server_users(queue, passwords):
    """redis-server's arguments that define the users: every one of REDIS_USERS with its password
    (passwords[user]), `admin` with every right, and the default user, without a password, that
    may only PING."""
    args = ["--user", "default", "on", "nopass", "resetkeys", "resetchannels", "-@all", "+ping"]
    for user in REDIS_USERS:
        args += ["--user", user, "on", f">{passwords[user]}", *acl_rules(user, queue)]
    return args + ["--user", "admin", "on", f">{passwords['admin']}", "~*", "&*", "+@all"]
