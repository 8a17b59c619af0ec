"""Predicted vs measured memory of one CPU Petals server holding 2, 4 and 8 blocks of a tiny and a
larger random Llama: the planner's prediction (core.engines.petals.placement: the server process
with its handlers, plus the blocks at Petals' own size) against the PSS of the server's whole
process tree after a short generation through it (the model has exactly that many blocks, so one
server serves it all). Measured right after start, the PSS does not grow with the blocks: the
weights are mapped from the safetensors file and become resident only when inference touches
them. The attention cache is left out of the prediction: a short generation allocates a few KiB
of it, and the plan counts the full cache on top as a worst case.

.venv/bin/python bench/petals_budget.py [--handlers 2] [--blocks 2,4,8]

Needs root (a loopback-only network namespace) and the Petals venv (scripts/petals-env.sh)."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.config import parse_config  # noqa: E402
from core.engines.petals import placement as petals_swarm  # noqa: E402
from core.planning.model_info import read_hf_info  # noqa: E402
from tests.petals_swarm import PetalsSwarm, skip_reason  # noqa: E402

MIB = 1 << 20
MODELS = {
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_heads": 4, "vocab_size": 1000},
    "larger": {"hidden_size": 1024, "intermediate_size": 2816, "num_heads": 16,
               "vocab_size": 8000},
}


def tree_pss(server: object) -> int:
    total = 0
    for proc in server.tree():  # type: ignore[attr-defined]
        try:
            total += proc.memory_full_info().pss
        except psutil.Error:
            continue
    return total


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--handlers", type=int, default=2)
    parser.add_argument("--blocks", default="2,4,8")
    args = parser.parse_args()
    counts = [int(c) for c in args.blocks.split(",")]
    reason = skip_reason()
    if reason and "opt-in" not in reason:
        print(f"cannot run: {reason}")
        return 1
    config = parse_config({"petals": {"num_handlers": args.handlers},
                           "nodes": [{"name": "a", "host": "127.0.0.1", "backend": "petals"}]},
                          Path("/bench.toml"))
    overhead = petals_swarm.process_bytes(config)
    rows = [("model", "blocks", "block MiB", "predicted MiB", "PSS idle MiB",
             "PSS after generation MiB", "error", "ONLINE s")]
    for name, spec in MODELS.items():
        for count in counts:
            with tempfile.TemporaryDirectory(prefix="tbz-budget-") as tmp, \
                    PetalsSwarm(Path(tmp), dht_prefix=f"bench{name}{count}") as swarm:
                swarm.write_tiny_llama(num_layers=count, hidden_size=spec["hidden_size"],
                                       intermediate_size=spec["intermediate_size"],
                                       num_heads=spec["num_heads"],
                                       vocab_size=spec["vocab_size"])
                assert swarm.model_dir is not None
                info = read_hf_info(swarm.model_dir, "float32")
                block = petals_swarm.petals_block_bytes(info.layer_bytes[0] // 4, 4)
                started = time.monotonic()
                server = swarm.start_server("s", (0, count), initial_peers=None,
                                            num_handlers=args.handlers)
                server.wait_for_log(r"\bStarted\b", timeout=300)
                online = time.monotonic() - started
                time.sleep(3.0)  # let the handlers settle
                idle = tree_pss(server)
                swarm.generate([1, 5, 9, 13], 4)  # touches every block's weights
                measured = tree_pss(server)
                predicted = overhead + count * block
                rows.append((name, str(count), f"{block / MIB:.1f}", f"{predicted / MIB:.0f}",
                             f"{idle / MIB:.0f}", f"{measured / MIB:.0f}",
                             f"{(predicted - measured) / measured * 100:+.0f}%",
                             f"{online:.1f}"))
                print("  ".join(rows[-1]), file=sys.stderr, flush=True)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))
    print(f"\npredicted = {petals_swarm.PROCESS_BASE_BYTES // MIB} MiB process + "
          f"{petals_swarm.HANDLER_BYTES // MIB} MiB x {args.handlers} handlers + blocks "
          "(Petals' size, float32); error = (predicted - PSS after generation) / PSS after "
          "generation")
    return 0


if __name__ == "__main__":
    sys.exit(main())
