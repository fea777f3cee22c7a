"""Real HTTP servers for tests, run in a background thread on 127.0.0.1 with an ephemeral port.

* :class:`~tests.servers.fault.FaultServer`: an OpenAI-style endpoint whose behaviour is scripted per
  request (slow, hang, 5xx, 429 + Retry-After, malformed JSON, empty content, dropped connection, ...)
  and which records every request it got.
* :class:`~tests.servers.tiny_openai.TinyOpenAIServer`: ``/v1/chat/completions`` served by a real
  (tiny, randomly initialised) transformers model.
"""

from tests.servers.base import BackgroundHTTPServer, RecordedRequest
from tests.servers.fault import Action, FaultServer
from tests.servers.tiny_openai import TinyOpenAIServer, build_tiny_verifier_model

__all__ = ["Action", "BackgroundHTTPServer", "FaultServer", "RecordedRequest", "TinyOpenAIServer",
           "build_tiny_verifier_model"]
