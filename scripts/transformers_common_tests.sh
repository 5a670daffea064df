#!/usr/bin/env bash
# transformers' own common tests (ModelTesterMixin, ProcessorTesterMixin) against the tiny MoWE preset, taken from
# the sdist of the installed transformers version (pip-cached, unpacked once under .cache/). Not in the default
# suite (several minutes on 2 cores); what they flag and why is in docs/CONFORMANCE.md.
#   bash scripts/transformers_common_tests.sh [pytest args, e.g. -k get_audio_features]
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
py=$repo/.venv/bin/python
version=$($py -c "import transformers; print(transformers.__version__)")
root=.cache/transformers-common-$version
if [ ! -f "$root/tests/test_modeling_common.py" ]; then
    mkdir -p "$root"
    $py -m pip download -q --no-deps --no-binary :all: "transformers==$version" -d "$root"
    tar -xzf "$root/transformers-$version.tar.gz" -C "$root" --strip-components=1 "transformers-$version/tests"
    # The sdist ships tests/*.py only: the generation and export mixins they import are stubbed (not run), and the
    # repository's utils/fetch_hub_objects_for_ci.py (which maps test media URLs to a CI cache) keeps URLs as they are.
    mkdir -p "$root/tests/generation" "$root/tests/exporters" "$root/tests/models/mowe" "$root/utils"
    echo "def url_to_local_path(url, **kwargs): return url" > "$root/utils/fetch_hub_objects_for_ci.py"
    touch "$root/tests/__init__.py" "$root/tests/generation/__init__.py" "$root/tests/exporters/__init__.py" \
        "$root/tests/models/__init__.py" "$root/tests/models/mowe/__init__.py"
    echo "class GenerationTesterMixin: pass" > "$root/tests/generation/test_utils.py"
    echo "class ExportTesterMixin: pass" > "$root/tests/exporters/test_export.py"
fi
cp tests/transformers_common/mowe_common_tests.py "$root/tests/models/mowe/test_modeling_mowe.py"
cd "$root"
MOWE_REPO=$repo PYTHONPATH=$repo HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false $py -m pytest tests/models/mowe -p no:cacheprovider -q -rfE "$@"
