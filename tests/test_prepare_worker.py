"""Corpus-preparation workers need only the slim install (launch/prepare_worker/setup.py): the stages run
with jax, TensorFlow, torch and the rest of the training stack made unimportable, and the slim
package's pins are the root setup.py's."""
import ast
import json
import re
import subprocess
import sys

from conftest import REPO

GPT2 = str(REPO.parent / "shared" / "data" / "gpt2_tokenizer")

# Every stage a worker runs, in a process where the heavy packages cannot be imported.
WORKER = r"""
import sys
BLOCKED = {"jax", "jaxlib", "flax", "optax", "orbax", "tensorflow", "tensorflow_datasets", "torch", "transformers",
           "ml_collections", "chex", "tensorstore", "safetensors"}
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is not installed on a preparation worker")
sys.meta_path.insert(0, Block())
from biomedlm_jax.data import prepare, prepare_stages as st
inputs, tok, out = sys.argv[1:4]
job = prepare.make_job(inputs.split(","), tok, out, seq_len=32, rows_per_shard=100, eval_fraction=0.1)
for u in range(job.units):
    st.tokenize_unit(job, u)
winners = st.resolve_all(e for u in range(job.units) for e in st.record_events(job, u))
dups = st.duplicates_all(winners)
lay = st.layout(job, [st.plan_unit(job, u, winners.get(u, []), dups.get(u, ())) for u in range(job.units)])
for task in st.shard_tasks(lay):
    st.write_shard(job, task, lay)
st.finish(job, lay)
print(sorted(m.split(".")[0] for m in sys.modules if m.split(".")[0] in BLOCKED))
"""


def test_preparation_stages_run_without_the_training_stack(tmp_path):
    inputs = [str(REPO / "tests" / "fixtures" / "pubmed_baseline_sample.xml"),
              str(REPO / "tests" / "fixtures" / "pmc_jats_sample.xml"),
              str(REPO / "data" / "pubmed_abstracts" / "abstracts.jsonl")]
    r = subprocess.run([sys.executable, "-c", WORKER, ",".join(inputs), GPT2, str(tmp_path / "out")],
                       capture_output=True, text=True, cwd=REPO, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1] == "[]"
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["splits"]["train"]["rows"] > 0


def _pins(path) -> dict:
    tree = ast.parse(path.read_text())
    pins = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            m = re.fullmatch(r"([A-Za-z0-9_.\-]+)(\[[a-z,\-]+\])?==([\w.]+)", node.value)
            if m:
                pins[m.group(1).lower()] = m.group(3)
    return pins


def test_the_slim_worker_package_pins_what_the_root_pins():
    slim, root = _pins(REPO / "launch" / "prepare_worker" / "setup.py"), _pins(REPO / "setup.py")
    assert set(slim) == {"numpy", "tokenizers", "etils", "fsspec", "gcsfs", "s3fs"}
    assert {k: root.get(k) for k in slim} == slim
