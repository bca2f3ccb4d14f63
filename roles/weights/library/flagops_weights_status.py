#!/usr/bin/python
"""Report a running flagops_weights job: its progress record while it runs, its result after.

Polled by the role (``until: finished``) so each poll is an event the driver shows: bytes
done/total, rate, ETA. When the async job has finished, returns the job's own result (and
fails with its message when it failed) and removes the job's status file.
"""
from __future__ import annotations

import json
import os
import time

from ansible.module_utils.basic import AnsibleModule

DOCUMENTATION = r"""
module: flagops_weights_status
short_description: Progress, then result, of an async flagops_weights job
options:
  jid: {type: str, required: true, description: ansible_job_id of the async task}
  progress_file: {type: path, description: the job's progress record}
  async_dir: {type: path, default: ~/.ansible_async}
  wait_s: {type: float, default: 1.0, description: wait up to this long for the job to finish before reporting}
"""


def main():
    module = AnsibleModule(
        argument_spec=dict(jid=dict(type="str", required=True), progress_file=dict(type="path"),
                           async_dir=dict(type="path", default="~/.ansible_async"),
                           wait_s=dict(type="float", default=1.0)),
        supports_check_mode=True,
    )
    p = module.params
    job = os.path.join(os.path.expanduser(p["async_dir"]), p["jid"])
    deadline = time.monotonic() + max(0.0, p["wait_s"])
    while True:
        try:
            with open(job) as fh:
                data = json.load(fh)
        except FileNotFoundError:
            module.fail_json(msg="weights: job %s has no status file %s" % (p["jid"], job), finished=True)
        except ValueError:
            data = {"started": 1, "finished": 0}  # being written right now
        running = set(data) <= {"started", "finished", "ansible_job_id"} and not data.get("finished")
        if not running or time.monotonic() >= deadline:
            break
        time.sleep(0.1)
    progress = None
    if p["progress_file"]:
        try:
            with open(p["progress_file"]) as fh:
                progress = json.load(fh)
        except (OSError, ValueError):
            progress = None
    if running:
        module.exit_json(changed=False, finished=False, progress=progress)
    os.unlink(job)
    if p["progress_file"]:
        try:
            os.unlink(p["progress_file"])
        except OSError:
            pass
    data.pop("invocation", None)
    for k in ("started", "ansible_job_id", "results_file"):
        data.pop(k, None)
    data["finished"] = True
    data["progress"] = progress
    if data.get("failed"):
        msg = data.pop("msg", "weights: the download job failed")
        module.fail_json(msg=msg, **data)
    module.exit_json(**data)


if __name__ == "__main__":
    main()
