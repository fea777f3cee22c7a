"""SGLang as a :class:`~megatron_guided.rollout.engine.GenerationEngine` (policy and verifier).

* :mod:`.server`: launch / attach / health / teardown of server processes;
* :mod:`.protocol`: the native ``/generate`` wire format (pure functions);
* :mod:`.client`: async HTTP to the replicas with retries, sticky routing and dead-server detection;
* :mod:`.weight_sync`: trainer → server weight transfer (disk, tensor, distributed);
* :mod:`.engine`: :class:`SGLangEngine`, tying them together.

Nothing here imports sglang: the servers run in their own interpreter (``worker.rollout.sglang.python``).
"""
