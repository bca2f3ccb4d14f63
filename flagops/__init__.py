"""flagops: an Ansible inventory + a release catalog entry -> a FlagScale/vLLM service.

Kept import-free so `flagops --help` stays fast; submodules load on demand.
"""

from __future__ import annotations

__version__ = "0.1.0"
