# Sourced by bench/gpu_check.sh and bench/host_check.sh: the interpreter ($py), the output
# folder ($out: the device tool's $OUT, else /tmp/$1), and paramserve importable, from the
# wheels bench/gpu_wheels.sh put in .whl/ when they were carried.
py=${PYTHON:-python3}
out=${OUT:-/tmp/$1}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
"$py" -c "import paramserve.optim_core, paramserve.server.app" || {
  echo "$1: paramserve does not import here (run bench/gpu_wheels.sh and carry .whl)"
  exit 1
}
