"""What the web tier needs from its server: gunicorn's gevent worker, which holds thousands of
waiting requests per process at the cost of a greenlet each.

- StampingGeventWorker notes when each request arrived, where its deadline starts.
- off_loop runs CPU work (decoding an upload) in a native thread, so a large image does not stall
  the event loop: other requests are still accepted, refused or answered meanwhile.
- client_watch stops a request's wait when its client hangs up, so its job can be withdrawn.
- DecodeBudget bounds the bytes of images being decoded at once in one process.

Outside gevent (e.g. the Flask development server) the same calls work, without the first three.
"""
import contextlib
import socket
import threading
import time

import gevent
from gevent import monkey
from gunicorn.workers.ggevent import GeventWorker

from helpers import ServiceError

ARRIVED_AT = "keras_server.arrived_at"  # environ key: time.time() when the request arrived


class StampingGeventWorker(GeventWorker):
    """gunicorn's gevent worker, plus environ[ARRIVED_AT]: when the connection was accepted (its
    first request; a connection's greenlet starts as it is accepted) or, on a kept-alive
    connection, when the request was read."""

    def handle(self, listener, client, addr):
        gevent.getcurrent().arrived_at = time.time()
        super().handle(listener, client, addr)

    def handle_request(self, listener_name, req, sock, addr):
        handler = gevent.getcurrent()
        handler.arrived_at = getattr(handler, "arrived_at", None) or time.time()
        try:
            return super().handle_request(listener_name, req, sock, addr)
        finally:
            handler.arrived_at = None

    def load_wsgi(self):
        super().load_wsgi()
        app = self.wsgi

        def stamped(environ, start_response):
            environ[ARRIVED_AT] = getattr(gevent.getcurrent(), "arrived_at", None)
            return app(environ, start_response)

        self.wsgi = stamped


def is_gevent():
    """True in a process that gevent has monkey-patched (a gunicorn gevent worker)."""
    return monkey.is_module_patched("socket")


def off_loop(function, *args):
    """function(*args) in one of gevent's native threads (Pillow lets go of the GIL while it
    decodes); called directly outside gevent."""
    if is_gevent():
        return gevent.get_hub().threadpool.apply(function, args)
    return function(*args)


class ClientGone(Exception):
    """The client closed its connection before its answer was ready."""


@contextlib.contextmanager
def client_watch(connection):
    """Raise ClientGone in the body if the client at the other end of `connection` (the socket
    gunicorn hands the app) hangs up meanwhile. Behind nginx too: it closes its connection to the
    web instance when its client aborts."""
    if connection is None or not is_gevent():
        yield
        return
    waiter = gevent.getcurrent()

    def watch():
        try:
            gevent.socket.wait_read(connection.fileno())
            gone = connection.recv(1, socket.MSG_PEEK) == b""  # else: the client sent more data
        except OSError:
            gone = True
        if gone:
            waiter.kill(ClientGone(), block=False)

    watcher = gevent.spawn(watch)
    try:
        yield
    finally:
        watcher.kill(block=False)


class DecodeBudget:
    """Bytes of images being decoded at once in this process, held under a total."""

    def __init__(self, total_bytes):
        self.total = self.free = total_bytes
        self.changed = threading.Condition()  # gevent's, once monkey-patched

    @contextlib.contextmanager
    def reserve(self, nbytes, deadline):
        """Hold nbytes of the budget for the body: 413 if more than all of it, 503 if not free
        before the deadline."""
        if nbytes > self.total:
            raise ServiceError(f"decoding this image takes about {nbytes >> 20} MiB, more than the "
                               f"{self.total >> 20} MiB a web process may spend (DECODE_BUDGET_BYTES)",
                               413)
        with self.changed:
            if not self.changed.wait_for(lambda: self.free >= nbytes, deadline - time.time()):
                raise ServiceError("the web tier is busy decoding other images; retry shortly", 503,
                                   {"Retry-After": "1"})
            self.free -= nbytes
        try:
            yield
        finally:
            with self.changed:
                self.free += nbytes
                self.changed.notify_all()
