"""Reaching nodes: transports (SSH via asyncssh, local), shell quoting, detached processes on a
node, SSH tunnels and the node probe. Knows no engine: it runs, spawns, tails and stops what it
is given. May import: core.config, core.status, core.text. Never: engines, planning,
supervision, operations, tui."""
