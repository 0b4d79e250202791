"""Running entries at sites: Slurm job arrays of VMs (deploy.py on the submitting host, task.py on each node)."""
