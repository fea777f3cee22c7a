"""Wait until a Ray cluster has its nodes (slurm/ray_on_slurm.sh, before training starts).

    python3 -m megatron_guided.launch.wait_for_ray --address 10.0.0.1:6379 --nodes 8 --timeout 600
"""

from __future__ import annotations

import argparse
import socket
import sys
import time

import ray


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", required=True)
    parser.add_argument("--nodes", type=int, required=True)
    parser.add_argument("--timeout", type=float, default=600.0)
    args = parser.parse_args(argv)
    deadline = time.monotonic() + args.timeout
    host, port = args.address.rsplit(":", 1)
    while True:  # the head may not listen yet (ray.init would wait on its own, without our deadline)
        try:
            socket.create_connection((host, int(port)), timeout=2.0).close()
            break
        except OSError:
            if time.monotonic() > deadline:
                print(f"ray: no head at {args.address} after {args.timeout:.0f} s", file=sys.stderr)
                return 1
            time.sleep(1.0)
    ray.init(address=args.address, log_to_driver=False)
    try:
        while (alive := sum(node["Alive"] for node in ray.nodes())) < args.nodes:
            if time.monotonic() > deadline:
                print(f"ray: {alive} of {args.nodes} nodes joined within {args.timeout:.0f} s", file=sys.stderr)
                return 1
            time.sleep(1.0)
    finally:
        ray.shutdown()
    print(f"ray: {alive} node(s) up at {args.address}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
