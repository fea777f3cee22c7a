"""Scale-out: where the Megatron ranks and the generation engines run.

`placement` (pure: the plan), `ray_cluster` (executes a plan on Ray), `ray_workers` (ranks as actors,
`RayWorkerGroup`), `ray_engine` (an engine in an actor, `RemoteEngine`), `ray_run` (what
`train/main.py` calls for `cluster.launcher=ray`). Ray is imported only by the `ray_*` modules.
"""
