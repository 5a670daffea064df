#!/usr/bin/env bash
# transformers' own common tests (ModelTesterMixin, GenerationTesterMixin, ProcessorTesterMixin) against the tiny MoWE
# preset, from the test sources of the INSTALLED transformers version (whatever `pip install` resolved). Not in the
# default suite (several minutes on 2 cores); what they flag and why is in docs/CONFORMANCE.md.
#   bash scripts/transformers_common_tests.sh [pytest args, e.g. -k get_audio_features]
#
# Where the sources come from (unpacked once under .cache/transformers-common-<version>/):
#   tests/*.py                     the sdist of that version (pip download, pip-cached).
#   tests/generation/test_utils.py GenerationTesterMixin: the sdist does not ship tests/generation/, so it comes from
#                                  the transformers git repository at tag v<version>, downloaded from GitHub
#                                  (raw.githubusercontent.com). Without access to GitHub, point TRANSFORMERS_GIT_DIR at
#                                  a clone of huggingface/transformers (its .git folder or a bare mirror) and the file
#                                  is read with `git show v<version>:tests/generation/test_utils.py`; TRANSFORMERS_GIT_REF
#                                  names another ref when the clone lacks the tag (say which in the results). The
#                                  source used is written to tests/generation/SOURCE and printed on every run.
#                                  MOWE_SKIP_GENERATION_TESTS=1 stubs the mixin instead (generation tests not run).
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
    # The export mixins are stubbed (export tests are not run), and the repository's utils/fetch_hub_objects_for_ci.py
    # (which maps test media URLs to a CI cache) keeps URLs as they are.
    mkdir -p "$root/tests/generation" "$root/tests/exporters" "$root/tests/models/mowe" "$root/utils"
    echo "def url_to_local_path(url, **kwargs): return url" > "$root/utils/fetch_hub_objects_for_ci.py"
    touch "$root/tests/__init__.py" "$root/tests/generation/__init__.py" "$root/tests/exporters/__init__.py" \
        "$root/tests/models/__init__.py" "$root/tests/models/mowe/__init__.py"
    printf 'class ExportTesterMixin:\n    pass\n\n\nclass ExportGenerateTesterMixin(ExportTesterMixin):\n    pass\n' \
        > "$root/tests/exporters/test_export.py"
fi

generation=$root/tests/generation/test_utils.py
if [ "${MOWE_SKIP_GENERATION_TESTS:-0}" = 1 ]; then
    echo "class GenerationTesterMixin: pass" > "$generation"
    echo "stub (MOWE_SKIP_GENERATION_TESTS=1): generation tests not run" > "$root/tests/generation/SOURCE"
elif [ ! -f "$root/tests/generation/SOURCE" ] || grep -q "^stub" "$root/tests/generation/SOURCE"; then
    tag=v$version
    url=https://raw.githubusercontent.com/huggingface/transformers/$tag/tests/generation/test_utils.py
    if [ -n "${TRANSFORMERS_GIT_DIR:-}" ]; then
        ref=${TRANSFORMERS_GIT_REF:-$tag}
        git --git-dir="$TRANSFORMERS_GIT_DIR" show "$ref:tests/generation/test_utils.py" > "$generation.part"
        echo "git $TRANSFORMERS_GIT_DIR $ref ($(git --git-dir="$TRANSFORMERS_GIT_DIR" rev-parse "$ref"))" \
            > "$root/tests/generation/SOURCE"
    elif $py -c "import sys, urllib.request; open(sys.argv[2], 'wb').write(urllib.request.urlopen(sys.argv[1], \
            timeout=30).read())" "$url" "$generation.part" 2>/dev/null; then
        echo "$url" > "$root/tests/generation/SOURCE"
    else
        rm -f "$generation.part"
        echo "Cannot download $url (GitHub unreachable?). GenerationTesterMixin is not in the transformers sdist:" >&2
        echo "set TRANSFORMERS_GIT_DIR to a clone of huggingface/transformers (TRANSFORMERS_GIT_REF if it lacks" >&2
        echo "$tag), or MOWE_SKIP_GENERATION_TESTS=1 to run without the generation tests." >&2
        exit 2
    fi
    mv "$generation.part" "$generation"
fi
echo "transformers $version; GenerationTesterMixin from: $(cat "$root/tests/generation/SOURCE")"

cp tests/transformers_common/mowe_common_tests.py "$root/tests/models/mowe/test_modeling_mowe.py"
cd "$root"
MOWE_REPO=$repo PYTHONPATH=$repo HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false $py -m pytest tests/models/mowe -p no:cacheprovider -q -rfE \
    -W ignore::pytest.PytestUnknownMarkWarning "$@"
