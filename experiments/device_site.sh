# Sourced by the scripts a lent GPU machine runs (experiments/gpu_sweep.sh, benchmarks/gpu_benchmarks.sh): what that
# machine's image lacks (SimpleITK, pydicom) travels in .whl/ as wheels, or as a wheel's files in a .tar.xz (about
# half the wheel's size: what travels to the machine is limited to 64 MiB; made here by
# `unzip -q simpleitk-*.whl -d D && tar cJf .whl/simpleitk.tar.xz -C D .`). use_device_site unpacks them into
# /tmp/site and puts that and the library on PYTHONPATH; without .whl/ only the library is added.
use_device_site() {  # PYTHON (a command: may carry options, as PY does): returns 3 when a carried file cannot be unpacked
  local py=$1 w t
  if [ -d .whl ]; then
    mkdir -p /tmp/site
    for w in .whl/*.whl; do [ -f "$w" ] || continue
      $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$w" || return 3
    done
    for t in .whl/*.tar.xz; do [ -f "$t" ] || continue; tar xJf "$t" -C /tmp/site || return 3; done
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
  fi
  export PYTHONPATH="$PWD/CTtoMRISynthesis${PYTHONPATH:+:$PYTHONPATH}"
}
