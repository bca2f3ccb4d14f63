"""``flagops verify``: is the deployed service healthy, is FlagGems really on, does it
compute what the reference computes, and how fast is it?

- :mod:`flagops.verify.checks`: the named checks (service, cluster, flaggems, gpu,
  output) and the runner that executes independent ones concurrently;
- :mod:`flagops.verify.output`: output consistency (greedy token ids vs a stored
  reference or a second endpoint) and ``--record-reference``;
- :mod:`flagops.verify.bench`: the async load generator behind ``--bench`` (metrics
  defined as ``vllm bench serve`` defines them) and the baseline comparison;
- :mod:`flagops.verify.cli`: the click command;
- ``probes/``: standalone scripts shipped into the containers (GPU / FlagGems);
- ``reference/``: stored reference outputs, ``<release>-<model>.json``.

Every check reports ``pass``, ``fail`` or ``skip`` with a reason and its measured values.
"""

from __future__ import annotations
