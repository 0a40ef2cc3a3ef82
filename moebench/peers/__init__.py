"""Peer adapters: other systems' routing code behind moebench's router interface.

Routers named ``peer:<system>.<function>`` call the routing function of a reference system
(Megatron-Core, DeepSpeed, Hugging Face transformers) on the case's logits and turn its
output into a :class:`~moebench.core.routing.Routing`, so a suite can put them next to moebench's
own routers on identical logits (docs/peers.md).

Importing this package is cheap: it registers thin adapter classes and imports none of the
peer libraries. A library is imported the first time an adapter needs it (``applicable`` or
``route``); where it is missing or fails to import, the adapter's rows are *skipped* with a
reason such as "megatron-core is not installed; pip install 'moebench[peers]'".
"""

from moebench.peers.base import PeerRouter, PeerSkip, library_problem
from moebench.peers import deepspeed_moe, hf_mixtral, megatron_core  # noqa: F401  (register the adapters)

__all__ = ["PeerRouter", "PeerSkip", "library_problem"]
