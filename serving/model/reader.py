"""Uploads decoded into the batch buffer, on a pool of threads, within a memory budget."""
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

import settings
from serving.errors import ServiceError
from serving.images import (MemoryBudget, decode_image, decode_reduced, hold_images_in_one_block,
                            open_image)
from serving.wire.connection import CLOCK


class ImageReader:
    """Puts each job's image into a batch buffer, as the model takes it (uint8, its input shape):
    an upload decoded and resized, or raw pixels copied.

    Uploads are decoded here, beside the model, rather than in the web tier: only the upload (a
    fraction of its pixels' bytes) crosses Redis, and only images a batch takes are decoded, not
    those refused or withdrawn later. They decode in a pool of threads (Pillow and OpenCV let go
    of the GIL), within a memory budget (decoding_bytes, with what a progressive JPEG's
    coefficients hold). Each lane has a buffer of its own, made once.
    """

    def __init__(self, input_shape, threads, budget_bytes):
        self.shape = tuple(input_shape)  # (height, width, channels)
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="decode")
        self.budget = MemoryBudget(budget_bytes)
        self.local = threading.local()
        hold_images_in_one_block(settings.MAX_IMAGE_PIXELS)

    def read(self, jobs):
        """(pixels of the jobs that could be read, in a view of this lane's buffer; those jobs;
        {job id: error record} of the others)."""
        buffer = self.buffer(len(jobs))[:len(jobs)]
        if len(jobs) > 1:
            errors = list(self.pool.map(self.read_one, jobs, buffer))
        else:  # a lone image is read here, without a hand-over to the pool and back
            errors = [self.read_one(job, row) for job, row in zip(jobs, buffer)]
        valid = [n for n, error in enumerate(errors) if error is None]
        pixels = buffer if len(valid) == len(jobs) else buffer[valid]
        refusals = {job["id"]: error for job, error in zip(jobs, errors) if error is not None}
        return pixels, [jobs[n] for n in valid], refusals

    def buffer(self, rows):
        """This lane's batch buffer, at least `rows` images long."""
        buffer = getattr(self.local, "buffer", None)
        if buffer is None or len(buffer) < rows:
            buffer = self.local.buffer = np.empty((max(rows, 1), *self.shape), np.uint8)
        return buffer

    def read_one(self, job, row):
        """Put one job's image into `row`; None, or its error record."""
        height, width, channels = self.shape
        try:
            if "shape" in job:
                pixels = np.frombuffer(job["data"], np.uint8)
                if tuple(job["shape"]) != self.shape or pixels.size != row.size:
                    raise ValueError(f"shape {tuple(job['shape'])} is not the model's {self.shape}")
                row[...] = pixels.reshape(self.shape)
                return None
            image = open_image(job["data"], settings.MAX_IMAGE_PIXELS, settings.ALLOWED_FORMATS)
            cost = decode_reduced(image, (width, height), channels)
            with self.budget.reserve(cost, job["deadline"] - CLOCK.offset):
                decode_image(image, job["data"], (width, height), channels, out=row)
            return None
        except ServiceError as refusal:
            return {"error": refusal.message, "status": refusal.status}
        except ValueError as exc:
            return {"error": f"cannot decode the queued image: {exc}", "status": 400}
