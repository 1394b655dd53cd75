"""Redis URLs that name several nodes, Sentinel's and Cluster's: read by settings.py to check them
at start, and by wire/connection.py to connect."""
from urllib.parse import unquote, urlsplit

from serving.text import is_whole_number


def sentinel_address(url):
    """(sentinels [(host, port)], master name, db, username, password) of a URL
    redis+sentinel://[user:password@]host:port[,host:port...]/MASTER[/db]; ValueError if bad."""
    nodes, path, username, password = nodes_url(url)
    master, db = (path + ["0"])[:2] if path else (None, None)
    if not master or len(path) > 2 or not is_whole_number(db):
        raise ValueError("expected redis+sentinel://host:port[,host:port...]/MASTER_NAME[/db]")
    return nodes, master, int(db), username, password


def cluster_address(url):
    """(nodes [(host, port)], username, password) of a URL
    redis+cluster://[user:password@]host:port[,host:port...]; ValueError if bad."""
    nodes, path, username, password = nodes_url(url)
    if path not in ([], ["0"]):
        raise ValueError("a Redis Cluster has one database, 0")
    return nodes, username, password


def nodes_url(url):
    """A URL naming several Redis nodes: (nodes, path parts, username, password)."""
    parts = urlsplit(url)
    if parts.query or parts.fragment:
        raise ValueError("options (?...) are not read from this URL")
    nodes = []
    for address in parts.netloc.rpartition("@")[2].split(","):
        host, colon, port = address.rpartition(":")
        if not (colon and host and is_whole_number(port) and 0 < int(port) < 65536):
            raise ValueError(f"{address!r} is not host:port")
        nodes.append((host.strip("[]"), int(port)))
    path = [unquote(part) for part in parts.path.split("/") if part]
    return (nodes, path, unquote(parts.username) if parts.username else None,
            unquote(parts.password) if parts.password else None)
