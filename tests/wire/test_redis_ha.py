"""Highly available Redis with real processes (Debian's redis-server and redis-sentinel): a
Sentinel failover under load, and the service on a 3-master Redis Cluster.
"""
import shutil
import signal
import subprocess
import threading
import time

import pytest
import redis
import requests
from redis.cluster import RedisCluster

import settings
from conftest import (LASTING_HEARTBEAT, Processes, assert_own_predictions, distinct_images,
                      free_port, frozen_workers, stop, tiny_settings, wait_until, worker_stats)
from serving.wire.keys import Keys

QUEUE = "ha_queue"
MASTER = "mymaster"


def redis_process(tmp_path, name, *args):
    folder = tmp_path / name
    folder.mkdir()
    with open(folder / "log", "wb") as log:
        return subprocess.Popen([shutil.which("redis-server"), "--bind", "127.0.0.1", "--save",
                                 "", "--appendonly", "no", "--dir", str(folder), *map(str, args)],
                                stdout=log, stderr=subprocess.STDOUT)


@pytest.fixture
def sentinel_redis(tmp_path):
    """A master, its replica and three sentinels (quorum 2, master down after 1 s), and a
    Processes for the service on them (stopped first at teardown)."""
    master_port, replica_port = free_port(), free_port()
    started = [redis_process(tmp_path, "master", "--port", master_port),
               redis_process(tmp_path, "replica", "--port", replica_port,
                             "--replicaof", "127.0.0.1", master_port)]
    sentinel_ports = [free_port() for _ in range(3)]
    for n, port in enumerate(sentinel_ports):
        conf = tmp_path / f"sentinel-{n}.conf"
        conf.write_text(f"port {port}\nbind 127.0.0.1\ndir {tmp_path}\n"
                        f"sentinel monitor {MASTER} 127.0.0.1 {master_port} 2\n"
                        f"sentinel down-after-milliseconds {MASTER} 1000\n"
                        f"sentinel failover-timeout {MASTER} 10000\n")
        with open(tmp_path / f"sentinel-{n}.log", "wb") as log:
            started.append(subprocess.Popen([shutil.which("redis-sentinel"), str(conf)],
                                            stdout=log, stderr=subprocess.STDOUT))
    sentinels = [redis.Redis(port=port, decode_responses=True) for port in sentinel_ports]

    def in_sync():
        replica = redis.Redis(port=replica_port).info("replication")
        return (replica.get("master_link_status") == "up"
                and all(len(s.sentinel_sentinels(MASTER)) == 2
                        and len(s.sentinel_slaves(MASTER)) == 1 for s in sentinels))

    wait_until(in_sync, timeout=30, what="the replica and the sentinels to know each other")
    url = f"redis+sentinel://{','.join(f'127.0.0.1:{p}' for p in sentinel_ports)}/{MASTER}/0"
    processes = Processes(url, tmp_path, QUEUE)
    yield {"master": started[0], "master_port": master_port, "sentinels": sentinels, "url": url,
           "processes": processes}
    processes.stop_all()  # the service's processes first, then the Redis they use
    for process in started:
        if process.poll() is None:
            process.send_signal(signal.SIGCONT)  # a master the test froze
        stop(process)


def classify(url, data):
    """One request: (when it started, its duration, status, answer or error)."""
    started = time.monotonic()
    try:
        response = requests.post(f"{url}/predict", files={"image": ("i.png", data)},
                                 params={"top_k": 10}, timeout=settings.REQUEST_TIMEOUT_S + 10)
        outcome = (response.status_code, response.json())
    except requests.RequestException as exc:
        outcome = (0, repr(exc))
    return (started, time.monotonic() - started, *outcome)


@pytest.mark.parametrize("failure", [signal.SIGKILL, signal.SIGSTOP],
                         ids=["master killed", "master frozen"])
def test_sentinel_failover_under_load(sentinel_redis, tiny_model, failure):
    """The master fails under a closed loop: killed (its connections reset), or frozen (they stay
    open and silent, as when a node is lost). The service answers again within 10 s of the
    promotion, with no restart; every request ends within its deadline with its own predictions
    or a 503."""
    processes = sentinel_redis["processes"]
    processes.worker(**tiny_settings(tiny_model))
    url = processes.web().url
    images = distinct_images(8)
    records, running = [], threading.Event()
    running.set()

    def client(n):
        while running.is_set():
            records.append((n, *classify(url, images[n])))

    clients = [threading.Thread(target=client, args=(n,)) for n in range(len(images))]
    try:
        for thread in clients:
            thread.start()
        wait_until(lambda: sum(r[3] == 200 for r in records) >= 20, what="answers before")
        killed_at = time.monotonic()
        sentinel_redis["master"].send_signal(failure)
        wait_until(lambda: int(sentinel_redis["sentinels"][0].sentinel_get_master_addr_by_name(
            MASTER)[1]) != sentinel_redis["master_port"], timeout=30,
            what="a sentinel to promote the replica")
        promoted_at = time.monotonic()
        wait_until(lambda: any(r[1] > promoted_at and r[3] == 200 for r in records),
                   timeout=60, what="an answer begun after the promotion")
        answered_at = min(r[1] + r[2] for r in records if r[1] > promoted_at and r[3] == 200)
        wait_until(lambda: sum(r[1] > answered_at and r[3] == 200 for r in records) >= 20,
                   what="answers after the failover")
    finally:
        running.clear()
        for thread in clients:
            thread.join(settings.REQUEST_TIMEOUT_S + 15)

    print(f"promoted {promoted_at - killed_at:.1f} s after the kill, answering again "
          f"{answered_at - promoted_at:.1f} s after the promotion; {len(records)} requests, "
          f"statuses {sorted({r[3] for r in records})}")
    assert answered_at - promoted_at <= 10
    for n, started, took, status, body in records:
        assert status in (200, 503), (status, body)
        assert took <= settings.REQUEST_TIMEOUT_S + 1, (took, status, body)
        if status == 200:  # its own answer: no request gets another's result
            assert_own_predictions(body["predictions"], images[n], tiny_model)


# --- Redis Cluster ------------------------------------------------------------------------------

@pytest.fixture
def redis_cluster(tmp_path):
    """Three masters holding all 16384 slots (no replicas), and a Processes for the service on
    them (stopped first at teardown)."""
    ports = [free_port() for _ in range(3)]
    # (The cluster bus port is given: its default, the port + 10000, may not exist.)
    started = [redis_process(tmp_path, f"node-{port}", "--port", port, "--cluster-enabled", "yes",
                             "--cluster-port", free_port(), "--cluster-config-file", "nodes.conf")
               for port in ports]
    for port in ports:
        wait_until(redis.Redis(port=port).ping, timeout=10, what="a cluster node to answer")
    subprocess.run([shutil.which("redis-cli"), "--cluster", "create",
                    *[f"127.0.0.1:{port}" for port in ports], "--cluster-yes"],
                   check=True, capture_output=True)
    client = RedisCluster(host="127.0.0.1", port=ports[0], decode_responses=True)
    wait_until(lambda: client.cluster_info()["cluster_state"] == "ok", timeout=30,
               what="the cluster to cover every slot")
    url = f"redis+cluster://127.0.0.1:{ports[0]}"
    processes = Processes(url, tmp_path, QUEUE)
    yield {"url": url, "client": client, "processes": processes}
    processes.stop_all()  # the service's processes first, then the Redis they use
    client.close()
    for process in started:
        stop(process)


def test_the_service_on_a_redis_cluster(redis_cluster, tiny_model):
    """Enqueue, batch claims, results, the overload bound and the re-queue of a SIGKILLed
    worker's jobs, with every key of the queue in one slot."""
    client, keys = redis_cluster["client"], Keys(QUEUE)
    slot = client.keyslot(QUEUE)
    every_key = [value for value in vars(keys).values()] + [
        build("x") for build in (keys.result, keys.job, keys.processing, keys.heartbeat,
                                 keys.refusals)]
    assert {client.keyslot(key) for key in every_key} == {slot}
    processes = redis_cluster["processes"]
    web = processes.web()
    images = distinct_images(8)

    # No worker yet: refused at once, the sign for an autoscaler left (in the queue's slot).
    refused = requests.post(f"{web.url}/predict", files={"image": ("i.png", images[0])},
                            timeout=60)
    assert refused.status_code == 503 and "no model worker" in refused.json()["error"]
    assert client.llen(keys.wake) == 1

    # The overload bound (a warm worker, frozen: the queue stays as filled).
    frozen = processes.worker(**LASTING_HEARTBEAT, **tiny_settings(tiny_model))
    nodes = [node.redis_connection for node in client.get_nodes()]
    with frozen_workers(client, keys, nodes):
        client.rpush(QUEUE, *[f"filler-{n}" for n in range(settings.MAX_QUEUE_LENGTH)])
        refused = requests.post(f"{web.url}/predict", files={"image": ("i.png", images[0])},
                                timeout=60)
        assert refused.status_code == settings.OVERLOAD_STATUS, refused.text
        assert "queue is full" in refused.json()["error"]
        assert client.llen(QUEUE) == settings.MAX_QUEUE_LENGTH
        client.delete(QUEUE)
    stop(frozen)

    # A long batch window: the victim holds a partial batch's jobs until it is killed.
    victim = processes.worker(BATCH_SIZE=8, BATCH_TIMEOUT_MS=60_000, **tiny_settings(tiny_model))
    # One request of 8 images: enqueued at once, claimed and answered as one batch.
    answer = requests.post(f"{web.url}/predict", files=[("image", ("i.png", d)) for d in images],
                           params={"top_k": 10}, timeout=60).json()
    for result, data in zip(answer["results"], images):
        assert result["batch_size"] == 8
        assert_own_predictions(result["predictions"], data, tiny_model)

    # The re-queue: the victim is killed holding 6 claimed jobs; a new worker answers them.
    claims = keys.processing(worker_stats(client, keys)[str(victim.pid)]["id"])
    records = []
    threads = [threading.Thread(target=lambda d=d: records.append((d, classify(web.url, d))))
               for d in images[:6]]
    for thread in threads:
        thread.start()
    wait_until(lambda: client.llen(claims) == 6, what="the victim to claim all 6 jobs")
    victim.send_signal(signal.SIGKILL)
    survivor = processes.worker(**tiny_settings(tiny_model))
    for thread in threads:
        thread.join(settings.REQUEST_TIMEOUT_S + 15)
    for data, (_, _, status, body) in records:
        assert status == 200, body
        assert_own_predictions(body["predictions"], data, tiny_model)
    wait_until(lambda: worker_stats(client, keys)[str(survivor.pid)]["requeued"] == "6",
               what="the survivor's heartbeat to count 6 re-queued jobs")
    assert client.llen(claims) == 0 and client.llen(QUEUE) == 0

