"""Security of loading (issue 40, part 4): weights, checkpoints and caches are safetensors or JSON,
nothing is unpickled, and loading a model folder runs none of its code.

- The package, the command lines, tools/ and bench/ are scanned for the calls that can run code
  from a file (pickle and its kin, torch.load, numpy's allow_pickle, eval, exec, yaml's unsafe
  loaders, trust_remote_code=True): any use fails the test naming its file and line, unless the
  allow-list below holds it with a reason.
- An exported model folder holds safetensors, JSON and YAML, and one file of code, pipeline.py, a
  single import of `diffusion.sampling.pipeline.Pipeline` that only diffusers' own loader runs (with
  `trust_remote_code=True`); `Pipeline.from_pretrained` never imports it, and never unpickles a
  weights file put in the folder instead of the safetensors.
- An embedding cache file that is a pickle (named like a store file) is rebuilt, never unpickled.
(That training runs write no pickle is tests/test_training.py's test_no_pickle_files_anywhere_in_the_run.)
"""

import ast
import json
import pickle
import shutil
import struct
from pathlib import Path

import pytest
import torch
from transformers import CLIPTextModel

from diffusion.errors import UserError

REPO = Path(__file__).resolve().parents[1]
SMALL_MODEL = REPO / "tests" / "assets" / "small-shapes"

# Modules that deserialise by running code, or can (numpy's load only with allow_pickle=True).
UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal", "jsonpickle"}
UNSAFE_CALLS = {
    ("torch", "load"): "torch.load unpickles (weights_only narrows it; safetensors needs no such care)",
    ("yaml", "load"): "yaml.load can build Python objects; use yaml.safe_load",
    ("yaml", "unsafe_load"): "builds arbitrary Python objects",
    ("yaml", "full_load"): "builds Python objects",
}
# (path relative to the repository, line): why the use there is safe. Empty: there are none.
ALLOWED: dict[tuple[str, int], str] = {}


def scanned_files() -> list[Path]:
    files = sorted(REPO.glob("*.py"))
    for folder in ("diffusion", "tools", "bench"):
        files += sorted((REPO / folder).rglob("*.py"))
    return files


def unsafe_uses(path: Path) -> list[tuple[int, str]]:
    """(line, what) of each use in `path` of a way to run code from data. Only code counts, not
    strings or comments (the docstrings say "no pickle" often)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, f"import {a.name}") for a in node.names if a.name.split(".")[0] in UNSAFE_MODULES]
        elif isinstance(node, ast.ImportFrom):
            module = (node.module or "").split(".")[0]
            if module in UNSAFE_MODULES:
                found.append((node.lineno, f"from {node.module} import ..."))
            for alias in node.names:
                if (module, alias.name) in UNSAFE_CALLS:
                    found.append((node.lineno, f"from {module} import {alias.name}"))
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            if node.value.id in UNSAFE_MODULES:
                found.append((node.lineno, f"{node.value.id}.{node.attr}"))
            if (node.value.id, node.attr) in UNSAFE_CALLS:
                found.append((node.lineno, f"{node.value.id}.{node.attr}"))
        elif isinstance(node, ast.Call):
            if isinstance(node.func, ast.Name) and node.func.id in ("eval", "exec", "__import__"):
                found.append((node.lineno, f"{node.func.id}()"))
            for keyword in node.keywords:
                value = keyword.value
                if keyword.arg in ("allow_pickle", "trust_remote_code", "weights_only") and not (
                    isinstance(value, ast.Constant) and value.value is (keyword.arg == "weights_only")
                ):
                    found.append((node.lineno, f"{keyword.arg}={ast.unparse(value)}"))
    return sorted(set(found))


def test_scanner_finds_each_kind_of_use(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import pickle\nfrom torch import load\nimport numpy as np\nimport yaml\n"
        "x = np.load('a.npy', allow_pickle=True)\ny = eval('1')\nz = yaml.load('a')\n"
        "w = pipe.from_pretrained('m', trust_remote_code=True)\nv = torch.load('f', weights_only=False)\n"
        "s = 'pickle torch.load eval(' # pickle\nok = np.load('a.npy', allow_pickle=False)\nmodel.eval()\n"
    )
    assert [line for line, _ in unsafe_uses(sample)] == [1, 2, 5, 6, 7, 8, 9, 9]


def test_nothing_in_the_package_loads_by_running_code():
    """No pickle, torch.load, allow_pickle, eval, exec, yaml.load or trust_remote_code=True in the
    package, the command lines, tools/ or bench/ (docs/ and tests/ may show or test them)."""
    uses = [
        f"{path.relative_to(REPO)}:{line}: {what}"
        for path in scanned_files()
        for line, what in unsafe_uses(path)
        if (str(path.relative_to(REPO)), line) not in ALLOWED
    ]
    assert len(scanned_files()) > 30
    assert uses == []


def safetensors_header(path: Path) -> dict:
    """The JSON header of a safetensors file (and that the file is one: 8-byte length, JSON, data)."""
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    ends = [entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"]
    assert 8 + length + max(ends) == len(data), path
    return header


def test_an_exported_model_is_safetensors_json_and_one_line_of_code():
    from diffusion.sampling.model_folder import PIPELINE_FILE

    files = sorted(p.relative_to(SMALL_MODEL).as_posix() for p in SMALL_MODEL.rglob("*") if p.is_file())
    assert {Path(f).suffix for f in files} <= {".safetensors", ".json", ".yaml", ".py"}, files
    assert [f for f in files if f.endswith(".py")] == ["pipeline.py"]
    # the only code: a docstring, then one import (this export's, made before the package had folders,
    # imports `diffusion.pipeline`; new exports import `diffusion`)
    for code in ((SMALL_MODEL / "pipeline.py").read_text(), PIPELINE_FILE):
        body = ast.parse(code).body
        assert [type(node) for node in body] == [ast.Expr, ast.ImportFrom]
        assert body[1].module in ("diffusion", "diffusion.pipeline") and body[1].names[0].name == "Pipeline"
    for name in files:
        if name.endswith(".safetensors"):
            assert safetensors_header(SMALL_MODEL / name)
        elif name.endswith(".json"):
            json.loads((SMALL_MODEL / name).read_text())


class WritesMarker:
    """Unpickled, it creates the file `marker`: what a weights file must never get to do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.fixture
def model_copy(tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(SMALL_MODEL, folder)
    return folder


def test_loading_a_model_folder_never_imports_its_pipeline_py(model_copy, tmp_path):
    from diffusion.sampling.pipeline import Pipeline

    marker = tmp_path / "ran"
    (model_copy / "pipeline.py").write_text(f"open({str(marker)!r}, 'w').close()\nraise SystemExit('imported')\n")
    pipe = Pipeline.from_pretrained(model_copy, device="cpu")
    assert pipe.unet is not None and not marker.exists()


@pytest.mark.parametrize(
    "part, weights, pickled",
    [
        ("unet", "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
        ("text_encoder", "model.safetensors", "pytorch_model.bin"),
    ],
)
def test_loading_never_unpickles_a_weights_file_put_in_place_of_the_safetensors(
    model_copy, tmp_path, part, weights, pickled
):
    from diffusion.sampling.pipeline import Pipeline

    marker = tmp_path / "ran"
    (model_copy / part / weights).unlink()
    with open(model_copy / part / pickled, "wb") as file:
        pickle.dump({"weight": WritesMarker(marker)}, file)  # what torch.save's legacy format holds
    torch.save({"weight": WritesMarker(marker)}, model_copy / part / "model.pt")  # the zip format too
    with pytest.raises(UserError) as caught:
        Pipeline.from_pretrained(model_copy, device="cpu")
    assert str(model_copy) in str(caught.value) and "\n" not in str(caught.value)
    assert not marker.exists()


def test_an_embedding_cache_file_that_is_a_pickle_is_rebuilt_not_unpickled(tmp_path):
    from diffusion.data.text_states import EmbeddingStore, cache_key
    from diffusion.model.text_encoder import TextEncoder
    from diffusion.training.clip import clip_text_config, fit_tokenizer

    captions = ["", "a red circle", "a blue square"]
    torch.manual_seed(0)
    tokenizer = fit_tokenizer(captions * 4, vocab_size=600, model_max_length=8)
    encoder = TextEncoder(tokenizer, CLIPTextModel(clip_text_config(tokenizer, 16, 1, 2, intermediate_size=32)))
    path = tmp_path / f"text-embeddings-{cache_key(encoder, captions)}.safetensors"
    marker = tmp_path / "ran"
    path.write_bytes(pickle.dumps({"embeddings": WritesMarker(marker)}))
    with pytest.warns(UserWarning, match="unusable"):
        store = EmbeddingStore.open(tmp_path, encoder, captions, progress=False)
    assert store.built and not marker.exists()
    assert set(safetensors_header(store.path)) == {"__metadata__", "embeddings", "key_mask"}


def test_the_readme_says_trust_remote_code_runs_the_folders_pipeline_py():
    readme = (REPO / "README.md").read_text()
    paragraphs = [p for p in readme.split("\n\n") if "trust_remote_code" in p]
    assert any("pipeline.py" in p and ("runs" in p or "executes" in p or "imports" in p) for p in paragraphs)
