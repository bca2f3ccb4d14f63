#!/bin/sh
# Runs inside the build container of the lab FlagOS image (flagops/lab/flagos_image.py):
#   /wheelhouse  (ro) every wheel of requirements.lock, fetched by the host's pip
#   /assets      (ro) this directory
# No network is needed: pip installs offline, --no-deps, hash-checked, from the lock.
set -eu
V=/opt/venvs/flagscale-inference
PY=$V/bin/python

python3 -m venv "$V"
"$PY" -m pip install --quiet --no-index --no-deps --no-cache-dir --disable-pip-version-check \
    --find-links /wheelhouse -r /assets/requirements.lock

# the platform plugin (own code, no deps)
rm -rf /tmp/vllm_cpu_ray && cp -r /assets/vllm_cpu_ray /tmp/vllm_cpu_ray
"$PY" -m pip install --quiet --no-index --no-deps --no-build-isolation --no-cache-dir \
    --disable-pip-version-check /tmp/vllm_cpu_ray
rm -rf /tmp/vllm_cpu_ray

# a `vllm` command that works with the vllm-cpu distribution name
install -m 0755 /assets/bin/vllm "$V/bin/vllm"

# dead weight: C/C++ headers and static libs (nothing is compiled in this image: PP needs no
# compiler), test suites, pip's caches
SP=$V/lib/python3.11/site-packages
rm -rf "$SP/torch/include" "$SP/torch/share/cmake" "$SP/torch/lib/"*.a
rm -rf "$SP/ray/tests" "$SP/flag_scale/third_party" "$SP"/*/tests/__pycache__
find "$V" -name '*.pyc' -path '*/tests/*' -delete
rm -rf /root/.cache /tmp/* /var/cache/apt/archives/*.deb /var/lib/apt/lists/*

# smoke: every CLI the lab uses answers, the plugin is found
"$PY" - <<'PY'
import importlib.metadata as md
eps = [e.name for e in md.entry_points(group="vllm.platform_plugins")]
assert eps == ["cpu_ray"], eps
for d in ("vllm-cpu", "ray", "flag_scale", "torch", "vllm-cpu-ray"):
    print(d, md.version(d))
for bad in ("torchvision", "torchaudio", "torchcodec", "triton"):
    try:
        md.version(bad)
    except md.PackageNotFoundError:
        continue
    raise SystemExit(f"{bad} must not be installed")
PY
# the serve runner's import chain (the runner puts site-packages/flag_scale on PYTHONPATH)
(cd "$SP/flag_scale" && "$PY" -c "from flagscale.runner.runner_serve import SSHServeRunner; import run")
"$V/bin/ray" --version
"$V/bin/flagscale" --version
echo "flagos build: ok"
