"""Computes each module's weight delta from a LoRA/LoHa/LoKr file with a WebUI's own loader code.

Run with the host's python (not imported by the suite):
    <host>/venv/bin/python tests/host_loaders.py a1111|forge HOST_DIR JOBS_JSON

JOBS_JSON: a list of {"lora": LORA_FILE, "base": BASE_FILE, "out": OUT_JSON}.

BASE_FILE holds, per kohya stem, the base weight (`<stem>.weight`) and the delta our training applied
(`<stem>.delta`). The host's real modules are imported from HOST_DIR (nothing is copied): A1111's
`extensions-builtin/Lora` network modules (with a few `modules.*` names stubbed, they only import them) and
Forge's `backend.patcher.lora` (load_lora + merge_lora_to_weight). OUT_JSON gets, per stem, the largest
absolute difference, the largest delta and base-weight magnitudes, and which stems the host applied.
"""
import json
import sys
import types

import torch
from safetensors.torch import load_file


def _stub(name, **attrs):
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    sys.modules[name] = module
    parent, _, child = name.rpartition(".")
    if parent:
        setattr(sys.modules[parent], child, module)
    return module


def _base_module(weight):
    if weight.dim() == 4:
        m = torch.nn.Conv2d(weight.shape[1], weight.shape[0], tuple(weight.shape[2:]), bias=False)
    else:
        m = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    m.weight = torch.nn.Parameter(weight.clone(), requires_grad=False)
    return m


def a1111_deltas(host, lora, stems, weights):
    if "modules" not in sys.modules:
        _setup_a1111(host)
    import network
    import network_hada
    import network_lokr
    import network_lora

    types_ = [network_lora.ModuleTypeLora(), network_hada.ModuleTypeHada(), network_lokr.ModuleTypeLokr()]
    net = network.Network("check", None)
    out = {}
    for stem in stems:
        w = {k[len(stem) + 1:]: v for k, v in lora.items() if k.startswith(stem + ".")}
        sd_module = _base_module(weights[stem])
        nw = network.NetworkWeights(network_key=stem, sd_key=stem, w=w, sd_module=sd_module)
        module = next((m for m in (t.create_module(net, nw) for t in types_) if m is not None), None)
        if module is None:
            continue
        with torch.no_grad():
            updown, _ = module.calc_updown(sd_module.weight)
        out[stem] = updown.float().reshape(weights[stem].shape)
    return out


def _setup_a1111(host):
    _stub("modules").__path__ = []
    for name in ("sd_models", "cache", "errors", "hashes", "shared"):
        _stub(f"modules.{name}")
    _stub("modules.models").__path__ = []
    _stub("modules.models.sd3").__path__ = []
    _stub("modules.models.sd3.mmdit", QkvLinear=type("QkvLinear", (torch.nn.Linear,), {}))
    _stub("modules.devices", cpu=torch.device("cpu"), device=torch.device("cpu"), dtype=torch.float32)
    sys.path.insert(0, f"{host}/extensions-builtin/Lora")


def forge_deltas(host, lora, stems, weights):
    if host not in sys.path:
        sys.argv = [sys.argv[0], "--always-cpu"]  # Forge's memory manager reads its flags at import
        sys.path[:0] = [host, f"{host}/packages_3rdparty"]
    from backend.patcher import lora as forge_lora

    patches, _ = forge_lora.load_lora(lora, {s: s for s in stems})
    out = {}
    for stem, patch in patches.items():
        weight = weights[stem]
        merged = forge_lora.merge_lora_to_weight([(1.0, patch, 1.0, None, None)], weight.clone())
        out[stem] = (merged - weight).float()
    return out


def main():
    kind, host, jobs_path = sys.argv[1:4]
    with open(jobs_path) as fh:
        jobs = json.load(fh)
    compute = a1111_deltas if kind == "a1111" else forge_deltas
    for job in jobs:
        lora = load_file(job["lora"])
        base = load_file(job["base"])
        weights = {k[:-len(".weight")]: v for k, v in base.items() if k.endswith(".weight")}
        stems = sorted(weights)
        deltas = compute(host, lora, stems, weights)
        report = {"applied": sorted(deltas), "total": len(stems), "max_abs_diff": {}, "max_abs_delta": {},
                  "max_abs_weight": {}}
        for stem, delta in deltas.items():
            trained = base[f"{stem}.delta"].float()
            report["max_abs_diff"][stem] = float((delta - trained).abs().max())
            report["max_abs_delta"][stem] = float(trained.abs().max())
            report["max_abs_weight"][stem] = float(weights[stem].abs().max())
        with open(job["out"], "w") as fh:
            json.dump(report, fh)


if __name__ == "__main__":
    main()
