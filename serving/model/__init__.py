"""The model worker: what a model spec may name (catalog), loading a classifier (loader,
classifier) on Keras or OpenVINO (openvino_runtime) at a precision (precision), choosing the batch
size (batch_size), and the worker that claims batches, runs one forward pass each and answers
every job (worker), with its parts: heartbeat, reader (uploads into the batch buffer), meters,
loader_pause."""
