"""Fine-tuning jobs: uploaded files, jobs on disk, and the manager that trains them in worker processes."""
