"""One server rank of a weight-update process group, for tests of distributed weight sync on CPU (gloo).

Joins the group as SGLang's servers do for ``/init_weights_update_group`` (``--impl sglang`` uses SGLang's
own ``init_custom_process_group``, needing the SGLang venv; ``--impl ours`` the trainer-side helper),
then for every ``/update_weights_from_distributed`` body read from stdin (one JSON line) receives the
named tensors by broadcast from rank 0, answers ``ok`` on stdout, and at EOF saves all of them::

    python -m tests.servers.dist_peer --init-method tcp://127.0.0.1:PORT --world-size 2 --rank 1 \\
        --group-name G --out received.safetensors [--impl ours|sglang]
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.distributed as dist
from safetensors.torch import save_file


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--init-method", required=True)
    p.add_argument("--world-size", type=int, required=True)
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--group-name", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--impl", choices=("ours", "sglang"), default="ours")
    args = p.parse_args()
    if args.impl == "sglang":
        from sglang.srt.utils.common import init_custom_process_group

        group = init_custom_process_group(backend="gloo", init_method=args.init_method, world_size=args.world_size,
                                          rank=args.rank, group_name=args.group_name)
    else:
        from megatron_guided.rollout.sglang.weight_sync import init_update_group

        group = init_update_group(backend="gloo", init_method=args.init_method, world_size=args.world_size,
                                  rank=args.rank, group_name=args.group_name)
    print("joined", flush=True)
    received: dict[str, torch.Tensor] = {}
    for line in sys.stdin:
        body = json.loads(line)
        for name, dtype, shape in zip(body["names"], body["dtypes"], body["shapes"], strict=True):
            tensor = torch.empty(shape, dtype=getattr(torch, dtype))
            dist.broadcast(tensor, src=0, group=group)
            received[name] = tensor
        print("ok", flush=True)
    save_file(received, args.out)


if __name__ == "__main__":
    main()
