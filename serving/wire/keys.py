"""The Redis keys of one queue."""


class Keys:
    """Every Redis key the service uses, built from one prefix (the queue's name).

    On Redis Cluster a script or a transaction may touch only keys of one hash slot. The queue's
    own key is its name (what KEDA's scaler and operators watch); every other key starts with
    the hash tag {name}, which hashes as the bare name does: all of a queue's keys share its slot.
    """

    def __init__(self, queue):
        self.queue = queue
        self.tag = f"{{{queue}}}"
        self.workers = f"{self.tag}:workers"
        self.queued_bytes = f"{self.tag}:queued_bytes"  # of the bodies of the jobs in the queue
        # The model rollouts (see serving/rollout/): the model every worker should serve, the
        # accepted versions (newest last, for start-ups and --rollback), the rollouts' counter,
        # and each rollout's refusals by worker.
        self.model = f"{self.tag}:model"
        self.model_history = f"{self.tag}:model:history"
        self.model_rollouts = f"{self.tag}:model:rollouts"
        # A list of one entry while the web tier refuses requests for want of a warm worker
        # (jobqueue.wake_workers): an autoscaler watching its length (KEDA's second trigger in
        # deploy/k8s) starts a worker when they are scaled to zero.
        self.wake = f"{self.tag}:wake"

    def refusals(self, rollout):
        return f"{self.tag}:model:refusals:{rollout}"

    def result(self, job_id):
        return f"{self.tag}:result:{job_id}"

    def job(self, job_id):
        """A job's body: it lives until the job is answered, or its deadline (see jobqueue)."""
        return f"{self.tag}:job:{job_id}"

    def processing(self, worker_id):
        return f"{self.tag}:processing:{worker_id}"

    def heartbeat(self, worker_id):
        return f"{self.tag}:worker:{worker_id}"
