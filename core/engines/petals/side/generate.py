"""Generate through a private Petals swarm with Petals' own client: greedy decoding of a prompt,
tokenized by the model directory's tokenizer. Prints one JSON line: the text, the token ids,
the seconds and tokens/s of the generation (client start not included).

    python generate.py MODEL_DIR --peers '[...]' --prefix P --prompt-stdin -n 16 < prompt.txt

The prompt comes on stdin (UTF-8, to its end, as is): a command line is readable by every user
of the machine (`ps`, /proc/PID/cmdline) and limited to 128 KiB per argument. `--prompt TEXT`
still works, for callers not moved yet.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import IO, Any, NoReturn

MARK = "TORBIZ-JSON "


def exit_now(model: Any, status: int = 0) -> NoReturn:
    """Leave without the interpreter's finalization. Petals 2.2.0's inference sessions close
    themselves in __del__ by running a coroutine on hivemind's event loop thread; collected at
    finalization, when that thread no longer runs, they wait forever (seen here: the answer was
    out, the servers had closed the sessions, and the client never exited: "the hang under
    load"). So: collect them now, while the loop runs, stop the DHT, and exit."""
    sys.stdout.flush()
    gc.collect()
    for module in model.modules() if model is not None else ():
        manager = getattr(module, "sequence_manager", None)
        if manager is not None:
            with contextlib.suppress(Exception):
                manager.shutdown()
            with contextlib.suppress(Exception):
                manager.dht.shutdown()  # the DHT process and its p2pd
            break
    sys.stdout.flush()
    os._exit(status)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir")
    parser.add_argument("--peers", required=True)
    parser.add_argument("--prefix", required=True)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt-stdin", action="store_true",
                        help="read the prompt from stdin (UTF-8, to its end)")
    source.add_argument("--prompt", help="the prompt itself (visible in ps: prefer stdin)")
    parser.add_argument("-n", "--new-tokens", type=int, default=16)
    parser.add_argument("--dtype", default="float32")
    # Petals' client defaults: connect 5 s, request 180 s, retries forever with a backoff that
    # doubles to 60 s, so one slow stream open on a loaded machine becomes a silent hang.
    parser.add_argument("--connect-timeout", type=float, default=30.0)
    parser.add_argument("--request-timeout", type=float, default=60.0)
    parser.add_argument("--max-retries", type=int, default=3)
    parser.add_argument("--sock-dir", help="a private directory for hivemind's unix sockets")
    return parser.parse_args(argv)


def read_prompt(args: argparse.Namespace, stdin: IO[bytes]) -> str:
    """The prompt, exactly as sent: stdin's bytes to their end, or --prompt."""
    if args.prompt_stdin:
        return stdin.read().decode("utf-8", "replace")
    return str(args.prompt)


def main() -> int:
    args = parse_args()
    prompt = read_prompt(args, sys.stdin.buffer)
    peers = json.loads(args.peers)
    if not peers:
        print(MARK + json.dumps({"error": "no initial peers"}))
        return 2

    from sockets import use_private_sockets

    use_private_sockets(args.sock_dir)
    import torch
    from petals import AutoDistributedModelForCausalLM
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    except Exception as exc:
        print(MARK + json.dumps({"error": f"no tokenizer in {args.model_dir}: "
                                          f"{type(exc).__name__}: {exc}"[:300]}))
        return 1
    started = time.perf_counter()
    model = AutoDistributedModelForCausalLM.from_pretrained(
        args.model_dir, initial_peers=peers, dht_prefix=args.prefix,
        torch_dtype=getattr(torch, args.dtype), connect_timeout=args.connect_timeout,
        request_timeout=args.request_timeout, max_retries=args.max_retries)
    loaded = time.perf_counter()
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    if ids.shape[1] == 0:
        ids = torch.tensor([[tokenizer.bos_token_id or 0]])
    mask = torch.ones_like(ids)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=args.new_tokens,
                             do_sample=False, pad_token_id=pad)
    done = time.perf_counter()
    new = out[0, ids.shape[1]:].tolist()
    seconds = done - loaded
    print(MARK + json.dumps({
        "text": tokenizer.decode(new, skip_special_tokens=True), "prompt_tokens": ids.shape[1],
        "tokens": new, "seconds": round(seconds, 3), "client_start_s": round(loaded - started, 3),
        "tokens_per_s": round(len(new) / seconds, 2) if seconds > 0 else None}))
    del out
    exit_now(model)


if __name__ == "__main__":
    sys.exit(main())
