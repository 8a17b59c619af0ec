"""The Petals engine: run_server processes on the nodes forming a private swarm, the DHT monitor
and generation client run in a Petals venv of their own (side/), and the venv recipe."""
