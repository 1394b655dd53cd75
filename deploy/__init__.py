"""Running the service beyond one process: the one-machine topology without Docker (topology), nginx's
configs, the Kubernetes manifests (k8s/) and Redis' passwords (see README.md)."""
