"""Supervision of a running cluster: the supervisor loop (detect a lost worker, back off), the
throughput monitor (llama-server's /metrics and /slots) and the coordinator's load log parser.
May import: reach, planning, config, status. Never: tui."""
