#!/usr/bin/env bash
# Downloads, on a CPU machine with PyPI, the wheels that the H200 image lacks
# into .whl/ (ignored by git), for Python 3.12 on x86_64. The device scripts
# (run_families_h200.sh) install them with --no-deps, so every dependency is
# named here: grain needs portpicker, tfds needs promise (an sdist, built
# here), and so on. Carry the folder: run(..., carry=[".whl", ".peer"]).
#   bash benchmarks/fetch_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
plat=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 \
         manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  plat+=(--platform "$p")
done
binary=(array_record==0.8.6 dm-tree==0.1.10 docstring_parser==0.18.0
        googleapis-common-protos==1.76.0 grain==0.2.18 immutabledict==4.3.1
        ml_collections==1.1.0 portpicker==1.6.0 simple-parsing==0.1.9
        tensorboardX==2.6.5 tensorflow-datasets==4.9.10
        tensorflow-metadata==1.21.0 termcolor==3.3.0 toml==0.10.2
        fla-core==0.6.0)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp "${plat[@]}" -d .whl "${binary[@]}"
python3 -m pip wheel -q --no-deps -w .whl promise==2.3
# The PyTorch peers' scripts travel beside them.
mkdir -p .peer && cp ../shared/tools/peer_baselines.py ../shared/tools/peer_variants.py .peer/
ls .whl | wc -l
