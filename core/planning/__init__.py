"""Planning: model facts (GGUF header, HF config), the layer planner, placement budgets and the
layer map. Pure: takes probes and model facts as values and returns plans; it opens no network
connection and starts nothing. May import: core.config, core.status, core.text. Never: reach,
engines, supervision, operations, tui, asyncssh, httpx."""
