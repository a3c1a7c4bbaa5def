python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl > $OUT/pip.log 2>&1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH=/tmp/site:.
python3 -m tandem._proto.build >/dev/null
T0=$(date +%s)
timeout 250 python3 bench/r2r_speed.py --device cuda --batches 1 --shares 0.13 --repeat 2 --router-width 256 --router-depth 2 --profile --out $OUT/r2r > $OUT/r2r.log 2>&1; echo "r2r rc=$? $(( $(date +%s)-T0 ))s"
grep -h '"kind"' $OUT/r2r.log | cut -c1-100
python3 - <<'PY'
import json, os
d = json.load(open(os.environ["OUT"] + "/r2r/r2r_speed_cuda.json"))["profile"]
for k, v in d.items():
    if isinstance(v, str):
        print("=====", k); print(v[-3500:])
    else:
        print(k, v)
PY
