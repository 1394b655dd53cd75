"""Model versions: the supervisor behind `run_keras_server.py model` (supervisor), the process
that serves one version (model_process), the server those processes are forked from (forks), a
version's spec (spec), the CPU priority of a loading process (priority), and the `reload` command
(reload)."""
