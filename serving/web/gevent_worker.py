"""What the web tier needs from its server: gunicorn's gevent worker, which holds thousands of
waiting requests per process at the cost of a greenlet each.

- StampingGeventWorker notes when each request arrived, where its deadline starts, and closes
  idle kept-alive connections as soon as it stops.
- off_loop runs CPU work (parsing a large body) in a native thread, so that it does not stall the
  event loop: other requests are still accepted, refused or answered meanwhile.
- request_deadline: when a request's answer is due.
- PacedBody cuts off a client that sends its request's body too slowly (408).
- client_watch stops a request's wait when its client hangs up, so its job can be withdrawn.

Outside gevent (e.g. the Flask development server) the same calls work, without the first four."""
import contextlib
import math
import select
import socket
import time

import gevent
from gevent import monkey
from gunicorn.http.errors import NoMoreData
from gunicorn.workers.ggevent import GeventWorker

import settings
from serving.errors import ServiceError

ARRIVED_AT = "keras_server.arrived_at"  # environ key: time.time() when the request arrived


def request_deadline(environ):
    """When this request's answer is due: REQUEST_TIMEOUT_S (or the client's shorter
    X-Request-Timeout-S) after it arrived. It arrived when nginx received it (X-Request-Start,
    which nginx sets) or, without nginx, when the web server accepted its connection; the earlier
    of the two counts, so the header can only shorten a deadline."""
    arrived = environ.get(ARRIVED_AT) or time.time()
    started = parse_request_start(environ.get("HTTP_X_REQUEST_START"))
    if started is not None:
        arrived = min(arrived, started)
    return arrived + parse_timeout(environ.get("HTTP_X_REQUEST_TIMEOUT_S"))


def parse_request_start(value):
    """Seconds since the epoch from X-Request-Start ("t=1700000000.123", nginx's $msec); None if
    absent or unreadable (the header is a proxy's hint, not the client's request)."""
    try:
        seconds = float(value.removeprefix("t="))
    except (AttributeError, ValueError):
        return None
    return seconds if math.isfinite(seconds) else None


def parse_timeout(value):
    """Seconds this request may take: REQUEST_TIMEOUT_S, or less if the client asks for less."""
    if value is None:
        return settings.REQUEST_TIMEOUT_S
    try:
        seconds = float(value)
    except ValueError:
        seconds = float("nan")
    if not 0 < seconds < float("inf"):
        raise ServiceError("X-Request-Timeout-S must be a positive number of seconds", 400)
    return min(seconds, settings.REQUEST_TIMEOUT_S)


class StampingGeventWorker(GeventWorker):
    """gunicorn's gevent worker, plus environ[ARRIVED_AT]: when the connection was accepted (its
    first request; a connection's greenlet starts as it is accepted) or, on a kept-alive
    connection, when the request was read."""

    def patch(self):
        super().patch()
        # redis-py polls a pooled connection before each command, for data left on it, never
        # waiting (timeout 0). gevent's poll does that at twenty times the system's cost, in the
        # path of every request; a poll that does not wait needs nothing of gevent.
        select.poll = monkey.get_original("select", "poll")

    def handle(self, listener, client, addr):
        gevent.getcurrent().arrived_at = time.time()
        super().handle(listener, client, addr)

    @contextlib.contextmanager
    def timeout_ctx(self):
        """The wait for a kept-alive connection's next request (up to `keepalive` s). Once the
        worker stops, the waiting connections are closed at once (as nginx does on a graceful
        shutdown) rather than held open until they time out: requests in progress still finish."""
        waiting = gevent.getcurrent()
        self.idle_connections.add(waiting)
        try:
            # SIGTERM's handler can run between any two steps of this greenlet: if it came before
            # this connection joined the idle ones (it closes those it finds), it closes here.
            if not self.alive:
                raise NoMoreData()
            with gevent.Timeout(self.cfg.keepalive, False):
                yield
        finally:
            self.idle_connections.discard(waiting)

    def handle_exit(self, sig, frame):
        super().handle_exit(sig, frame)
        # As if the client had left: gunicorn closes the connection without a word in its log.
        gevent.spawn(gevent.killall, list(self.idle_connections), NoMoreData, block=False)

    def init_process(self):
        self.idle_connections = set()
        super().init_process()

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
            environ["wsgi.input"] = PacedBody(environ["wsgi.input"], environ)
            return app(environ, start_response)

        self.wsgi = stamped


class SlowUpload(ServiceError):
    """A request's body came too slowly: 408, and the connection is closed."""

    def __init__(self, received):
        super().__init__(f"the request's body came too slowly ({received} bytes in time): it must "
                         f"keep arriving at {settings.MIN_UPLOAD_BYTES_PER_S} bytes a second "
                         f"after {settings.UPLOAD_TIMEOUT_S:g} s, and in full before the request's "
                         f"deadline", 408, {"Connection": "close"})


class PacedBody:
    """A request's body (wsgi.input) that must arrive at a pace: by UPLOAD_TIMEOUT_S after the
    request arrived plus one second per MIN_UPLOAD_BYTES_PER_S bytes received, and before the
    request's deadline, else SlowUpload. Without it, a client trickling a body a byte a second
    holds a connection until it stops, and a few thousand of them hold every one the web tier has.

    It reads in pieces that grow fourfold, each due by the time the pace allows for it, so a fast
    client costs a few timers, and a slow one is cut off within seconds."""

    FIRST_PIECE = 4096

    def __init__(self, stream, environ):
        self.stream, self.environ, self.received = stream, environ, 0
        self.arrived = environ.get(ARRIVED_AT) or time.time()
        self.deadline = None  # the request's, once its body is read (a GET's never is)

    def due(self, size):
        """When `size` more bytes must have arrived (time.time())."""
        if self.deadline is None:
            try:
                self.deadline = request_deadline(self.environ)
            except ServiceError:  # an unreadable X-Request-Timeout-S: the application says 400
                self.deadline = self.arrived + settings.REQUEST_TIMEOUT_S
        paced = self.arrived + settings.UPLOAD_TIMEOUT_S + (
            self.received + size) / settings.MIN_UPLOAD_BYTES_PER_S
        return min(self.deadline, paced)

    def paced(self, read, size, expected):
        """read(size), due when `expected` more bytes are (SlowUpload if they are not)."""
        with gevent.Timeout(max(0.0, self.due(expected) - time.time()), False):
            data = read(size)
            self.received += len(data)
            return data
        raise SlowUpload(self.received)

    def read(self, size=-1):
        pieces = []
        while size is None or size < 0 or size > 0:
            piece = max(self.FIRST_PIECE, 3 * self.received)
            if size is not None and size >= 0:
                piece = min(piece, size)
            data = self.paced(self.stream.read, piece, piece)
            if not data:
                break
            pieces.append(data)
            if size is not None and size >= 0:
                size -= len(data)
        return b"".join(pieces)

    def readline(self, size=-1):
        return self.paced(self.stream.readline, size, self.FIRST_PIECE)


def is_gevent():
    """True in a process that gevent has monkey-patched (a gunicorn gevent worker)."""
    return monkey.is_module_patched("socket")


def off_loop(function, *args):
    """function(*args) in one of gevent's native threads; called directly outside gevent."""
    if is_gevent():
        return gevent.get_hub().threadpool.apply(function, args)
    return function(*args)


class ClientGone(Exception):
    """The client closed its connection before its answer was ready."""


@contextlib.contextmanager
def client_watch(connection):
    """Raise ClientGone in the body if the client at the other end of `connection` (the socket
    gunicorn hands the app) hangs up meanwhile. Behind nginx too: it closes its connection to the
    web instance when its client aborts.

    It watches with the event loop's own watcher and a callback, not a greenlet of its own: this
    runs for every request."""
    if connection is None or not is_gevent():
        yield
        return
    waiter = gevent.getcurrent()
    watcher = gevent.get_hub().loop.io(connection.fileno(), 1)  # 1: readable

    def readable():
        watcher.stop()  # either way: gone, or the client sent more data (read after the answer)
        try:  # (readable: this does not wait)
            gone = connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            gone = True
        if gone:
            waiter.kill(ClientGone(), block=False)

    watcher.start(readable)
    try:
        yield
    finally:
        watcher.stop()
        watcher.close()
