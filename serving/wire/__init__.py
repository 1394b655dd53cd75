"""What crosses Redis between the tiers, and nothing else: the keys of a queue (keys), connecting
as the service's ACL users (connection), a job and its result (job_format), the queue's atomic
scripts for enqueueing, claiming, answering and re-queueing jobs (jobqueue), how a script is run
(scripts), and the model rollouts' records (records). Both tiers import this folder; it imports
neither."""
