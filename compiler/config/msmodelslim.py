"""Convert msModelSlim V1 quantization configs (the Ascend toolkit's YAML) into slimc config data.

    slimc migrate --from msmodelslim qwen3-w8a8.yaml > qwen3-w8a8.slimc.yaml

Every part that does not convert exactly gives one note naming it and what slimc does instead;
docs/msmodelslim.md has the mapping table.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from slimc.config import CONFIG_VERSION, read_config_text
from slimc.errors import ConfigError
from slimc.schemes import QuantScheme

# apiversion -> calibration data of that kind of model (msModelSlim's lab_calib files do not ship with slimc)
CALIBRATION = {
    "modelslim_v1": {"dataset": "builtin:text"},
    "multimodal_vlm_modelslim_v1": {"dataset": "builtin:image-text"},
    "multimodal_sd_modelslim_v1": {"dataset": "builtin:prompts", "samples": 16, "batch_size": 1},
}
QCONFIG_VALUES = {  # msModelSlim's QConfig: every key required; dtype and scope are its QDType and QScope
    "dtype": ("int8", "int4", "float", "mxfp8", "mxfp4", "fp8_e4m3"),
    "scope": ("per_tensor", "per_channel", "per_group", "per_block", "per_token", "pd_mix", "per_head", "dual_scale"),
    "symmetric": (True, False),
    "method": None,
}
WEIGHT_OBSERVERS = {"minmax": "minmax", "gptq": "minmax", "autoround": "minmax", "ssz": "mse"}
ACT_OBSERVERS = {"minmax": "minmax", "histogram": "mse"}
SLIMC_SCOPES = {"weight": ("per_channel", "per_group", "per_tensor"), "act": ("per_token", "pd_mix", "per_tensor")}
GPTQ_GROUP_SIZE = 128  # msModelSlim's GPTQ default group_size
SUBGRAPHS = {"norm-linear": "norm-linear", "ov": "v-o", "up-down": "up-down"}
SMOOTHERS = {"smooth_quant": 0.5, "iter_smooth": 0.9, "flex_smooth_quant": None, "flex_awq_ssz": None, "awq": None}
SAVERS = {"ascendv1_saver": "mindie", "ascendv1_saver_distributed": "mindie", "mindie_format_saver": "mindie",
          "compressed_tensors": "vllm"}
ANALYSIS = "analysis only; it does not change the quantized model"
NOT_CONVERTED = {
    "fa3_quant": "FlashAttention (FA3) quantization; slimc has no attention quantization, attention stays float",
    "kv_smooth": "smoothing for KV-cache quantization, which slimc does not do",
    "float_sparse": "sparsity; slimc does not prune, weights stay dense",
    "flatquant": "FlatQuant's learned transforms; the nearest slimc passes are norm_fusion + rotate (QuaRot)",
    "svd_res": "SVD low-rank residual branches have no slimc equivalent",
    "binary_analysis": ANALYSIS, "unary_analysis": ANALYSIS,
    "binary_operator_layer_wise": ANALYSIS, "binary_operator_model_wise": ANALYSIS,
}
SPEC_KEYS = ("process", "save", "dataset", "prior", "default_text", "multimodal_sd_config", "runner")


def read_msmodelslim(path: Path) -> dict:
    """Safe-load a msModelSlim YAML file, anchors, aliases and `<<` merge keys resolved.
    (slimc.config.read_yaml refuses merge keys, which msModelSlim's practice configs use.)"""
    path = Path(path)
    text = read_config_text(path)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a msModelSlim config is a mapping with apiversion, metadata and spec")
    return data


def from_msmodelslim(data: dict, *, source: str = "<config>") -> tuple[dict, list[str]]:
    """slimc config data for a parsed msModelSlim V1 config, and one note per part not converted exactly.

    msModelSlim quantizes a Linear with the first linear_quant that selects it: a step only visits modules
    that are still `nn.Linear` (processor/quant/linear.py, `_install_quantizer`), and a quantized layer no
    longer is one. In slimc the later rule wins, so the rules come out in reverse order."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a msModelSlim config is a mapping with apiversion, metadata and spec")
    api = data.get("apiversion")
    if api not in CALIBRATION:
        found = "required key is missing" if api is None else f"{api!r} is not a V1 apiversion"
        older = " (modelslim_v0 is the older calib_cfg / anti_cfg schema)" if api == "modelslim_v0" else ""
        raise ConfigError(f"{source}: apiversion: {found}{older}; expected one of {', '.join(CALIBRATION)}")
    spec = data.get("spec")
    if not isinstance(spec, dict) or not isinstance(spec.get("process"), list) or not spec["process"]:
        raise ConfigError(f"{source}: spec.process: expected a list of processors (type: linear_quant, ...)")
    converter = _Converter(source)
    for i, step in enumerate(spec["process"]):
        converter.process(step, f"spec.process[{i}]")
    if not converter.quant_steps:
        types = ", ".join(str(step.get("type")) for step in spec["process"] if isinstance(step, dict))
        raise ConfigError(f"{source}: spec.process: no linear_quant (types found: {types}); "
                          "slimc needs one to know which layers to quantize to what")
    if not converter.rules:
        raise ConfigError(f"{source}: spec.process: no linear_quant quantizes to int8 / int4, so slimc would quantize "
                          "nothing:\n" + "\n".join(converter.notes))
    converter.other_spec(spec, api)
    return converter.config(api, converter.export(spec.get("save"))), converter.notes


def expand_braces(glob: str) -> list[str]:
    """msModelSlim matches with wcmatch's fnmatch and BRACE (otherwise as fnmatch: `*` crosses dots), so
    `layers.{1,2}.*` and `layers.{0..3}.*` are lists. Innermost group first; repeats dropped."""
    group = re.search(r"\{([^{}]*)\}", glob)
    if group is None:
        return [glob]
    body = group.group(1)
    if span := re.fullmatch(r"(-?\d+)\.\.(-?\d+)", body):
        low, high = int(span.group(1)), int(span.group(2))
        step = 1 if high >= low else -1
        choices = [str(n) for n in range(low, high + step, step)]
    elif "," in body:
        choices = body.split(",")
    else:
        raise ValueError(f"glob {glob!r}: brace group {{{body}}} has no alternatives (expected {{a,b}} or {{1..3}})")
    expanded = [g for choice in choices for g in expand_braces(glob[: group.start()] + choice + glob[group.end():])]
    return list(dict.fromkeys(expanded))


class _Converter:
    def __init__(self, source: str):
        self.source = source
        self.notes: list[str] = []
        self.quant_steps = 0
        self.schemes: dict[str, dict] = {}
        self.rules: list[dict] = []  # msModelSlim's order (first wins); reversed for slimc (last wins)
        self.weight_algorithms: dict[str, str] = {}  # step -> rtn | gptq | autoround
        self.gptq: dict = {"damp": 0.01, "act_order": False}  # msModelSlim's GPTQ keeps the column order
        self.autoround: dict = {"iterations": 10}  # msModelSlim's autoround_quant default iters
        self.rotation: list[dict] = []
        self.smooth: dict | None = None
        self.smooth_at = ""
        self.rotate_inputs: dict | None = None
        self.kv_cache: dict | None = None

    def error(self, here: str, text: str) -> ConfigError:
        return ConfigError(f"{self.source}: {here}: {text}")

    def note(self, here: str, text: str) -> None:
        self.notes.append(f"{here}: {text}")

    def process(self, step: Any, where: str) -> None:
        if not isinstance(step, dict) or not isinstance(step.get("type"), str):
            raise self.error(where, "each processor is a mapping with `type:` (e.g. type: linear_quant)")
        kind = step["type"]
        here = f"{where} (type: {kind})"
        if kind == "group":  # runs its configs in order on each block: as if they were listed here
            for i, inner in enumerate(step.get("configs") or []):
                self.process(inner, f"{where}.configs[{i}]")
        elif kind == "linear_quant":
            self.linear_quant(step, here)
        elif kind == "autoround_quant":  # its strategies also go first-match-wins (_should_apply_strategy)
            self.autoround["iterations"] = step.get("iters", self.autoround["iterations"])
            self.note(here, f"weights rounded by AutoRound (calibrate weight_algorithm: autoround, {self.autoround['iterations']} "
                            "iterations); its other settings are slimc's defaults (docs/lowbit.md)")
            for i, strategy in enumerate(step.get("strategies") or []):
                self.linear_quant(strategy, f"{here} strategies[{i}]", autoround=True)
        elif kind in SMOOTHERS:
            self.smoothing(step, here, kind)
        elif kind in ("quarot", "adapt_rotation"):
            self.rotate(step, here, kind)
        elif kind == "dynamic_cache":
            self.dynamic_cache(step, here)
        elif kind == "online_quarot":
            self.rotate_inputs = {"pass": "rotate_inputs", "include": self.globs(step.get("include") or ["*"], here),
                                  "exclude": self.globs(step.get("exclude") or [], here)}
            if step.get("block_size", -1) != -1:
                self.note(here, f"block_size {step['block_size']}: rotate_inputs uses a full-width Hadamard per input")
        else:
            self.note(here, "not converted: " + NOT_CONVERTED.get(kind, "not a msModelSlim V1 processor this converter "
                                                                       "knows; nothing in the slimc config does its work"))

    def dynamic_cache(self, step: dict, here: str) -> None:
        """KV cache int8 per channel: fake_quant's `kv_cache` (docs/kvcache.md)."""
        qconfig = step.get("qconfig")
        if not isinstance(qconfig, dict):
            raise self.error(here, "qconfig: expected a mapping with dtype, scope, symmetric, method")
        if qconfig.get("dtype") != "int8" or qconfig.get("scope") != "per_channel":
            raise self.error(here, f"qconfig: dtype {qconfig.get('dtype')!r}, scope {qconfig.get('scope')!r}: the KV cache "
                                   "is quantized to int8 per_channel only (as msModelSlim's dynamic_cache requires)")
        self.kv_cache = {"dtype": "int8", "granularity": "per_channel", "symmetric": bool(qconfig.get("symmetric", True))}
        if qconfig.get("method", "minmax") != "minmax":
            self.note(here, f"qconfig.method {qconfig['method']!r}: the KV cache range is min/max over the calibration data")
        if [g for g in step.get("include") or ["*"] if g != "*"] or step.get("exclude"):
            self.note(here, "include / exclude: every attention of the text decoder gets an int8 KV cache")

    # --- linear_quant: a scheme and a fake_quant rule -------------------------------------------------

    def linear_quant(self, step: Any, here: str, autoround: bool = False) -> None:
        self.quant_steps += 1
        qconfig = step.get("qconfig") if isinstance(step, dict) else None
        if not isinstance(qconfig, dict) or "weight" not in qconfig:
            raise self.error(here, "qconfig: expected a mapping with `weight:` (and `act:` unless weight-only), "
                                   "each with dtype, scope, symmetric, method")
        scheme = self.scheme(qconfig, here)
        if scheme is None:
            return
        rule = {"scheme": self.scheme_name(scheme), "include": self.globs(step.get("include") or ["*"], here)}
        if step.get("exclude"):
            rule["exclude"] = self.globs(step["exclude"], here)
        if any(glob.endswith("experts") for glob in rule["include"]):
            rule["optional"] = True  # of the two expert spellings (see globs) only one matches a given model
        self.rules.append(rule)
        method = "autoround" if autoround else qconfig["weight"]["method"]
        self.weight_algorithms[here] = method if method in ("gptq", "autoround") else "rtn"

    def scheme(self, qconfig: dict, here: str) -> dict | None:
        """The slimc scheme of a LinearQConfig, or None (with a note) where slimc has no such dtype or scope."""
        act = qconfig.get("act")
        if act is not None and not isinstance(act, dict):
            raise self.error(here, "qconfig.act: expected a mapping with dtype, scope, symmetric, method")
        parts = {"weight": qconfig["weight"]}
        if act is not None and act.get("dtype") != "float":  # float activations: weight-only (msModelSlim's default)
            parts["act"] = act
        for name, part in parts.items():
            self.check(part, here, name)
        missing = [f"{name} {part['dtype']} {part['scope']}" for name, part in parts.items()
                   if part["dtype"] not in ("int8", "int4") or part["scope"] not in SLIMC_SCOPES[name]]
        if missing:
            bits = ["4" if part["dtype"] in ("int4", "mxfp4") else "8" for part in parts.values()]
            nearest = f"w{bits[0]}a{bits[1]}_dynamic" if len(bits) == 2 else f"w{bits[0]}a16"
            self.note(here, f"not converted: {', '.join(missing)} has no slimc equivalent (slimc quantizes to int8 / int4); "
                            f"the layers it selects stay float. Nearest slimc scheme: {nearest}")
            return None
        scheme = {name: self.part(part, here, name) for name, part in parts.items()}
        try:
            QuantScheme.model_validate(scheme)
        except ValidationError as error:
            raise self.error(here, f"qconfig: {error.errors()[0]['msg'].replace('Value error, ', '')}") from None
        return scheme

    def check(self, part: Any, here: str, name: str) -> None:
        if not isinstance(part, dict):
            raise self.error(here, f"qconfig.{name}: expected a mapping with dtype, scope, symmetric, method")
        for key, allowed in QCONFIG_VALUES.items():
            if key not in part:
                raise self.error(here, f"qconfig.{name}.{key}: required key is missing; each of weight and act has "
                                       "dtype, scope, symmetric, method")
            if allowed is not None and part[key] not in allowed:
                raise self.error(here, f"qconfig.{name}.{key}: {part[key]!r} is not one of {', '.join(map(str, allowed))}")

    def part(self, part: dict, here: str, name: str) -> dict:
        """A checked, convertible qconfig part as a slimc TensorScheme dict."""
        scope, ext = part["scope"], dict(part.get("ext") or {})
        spec: dict[str, Any] = {"dtype": part["dtype"], "granularity": scope, "symmetric": part["symmetric"]}
        if scope == "pd_mix":
            self.note(here, "qconfig.act.scope pd_mix (dynamic per token in prefill, static per tensor in decode): "
                            "dynamic per_token, symmetric, in both")
            spec.update(granularity="per_token", symmetric=True)
        if scope == "per_group":
            spec["group_size"] = ext.pop("group_size", GPTQ_GROUP_SIZE)
        if name == "act":
            spec["dynamic"] = spec["granularity"] == "per_token"
        if not spec.get("dynamic"):  # weights and static activations: how the range is found
            spec["observer"] = self.observer(part["method"], ext, here, name)
        for key, value in ext.items():
            self.note(here, f"qconfig.{name}.ext.{key} {value!r}: not converted; no slimc scheme option for it with {scope}")
        return spec

    def observer(self, method: str, ext: dict, here: str, name: str) -> str:
        observers = WEIGHT_OBSERVERS if name == "weight" else ACT_OBSERVERS
        if method == "gptq":
            self.gptq["damp"] = ext.pop("percdamp", self.gptq["damp"])
            if "block_size" in ext:
                self.gptq["block_size"] = ext.pop("block_size")
        elif method == "ssz":
            steps = ext.pop("step", None)
            self.note(here, f"qconfig.weight.method ssz (least-squares scale search{f', {steps} steps' if steps else ''})"
                            ": observer mse, slimc's clipping search for the lowest weight error")
        elif method == "histogram":
            self.note(here, "qconfig.act.method histogram (clipping searched over a histogram): observer mse, which "
                            "searches the clipping with the lowest error on the observed values")
        elif method not in observers:
            self.note(here, f"qconfig.{name}.method {method!r}: no slimc equivalent; observer minmax")
        return observers.get(method, "minmax")

    def scheme_name(self, scheme: dict) -> str:
        """The Ascend label (w8a8_dynamic, w8a8_static, w4a16, ...); another scheme with the same label gets _2, _3."""
        label = QuantScheme.model_validate(scheme).label.lower()
        label += "_static" if "act" in scheme and not scheme["act"]["dynamic"] else ""
        taken = 1
        name = label
        while self.schemes.setdefault(name, scheme) != scheme:
            taken += 1
            name = f"{label}_{taken}"
        return name

    def globs(self, globs: Any, here: str) -> list[str]:
        """msModelSlim globs as slimc globs: braces expanded, and a glob that reaches into per-expert Linears
        (`*mlp.experts.*`) also as the fused experts module that slimc quantizes as one layer (`*mlp.experts`)."""
        if not isinstance(globs, list) or not all(isinstance(glob, str) for glob in globs):
            raise self.error(here, f"include / exclude must be lists of globs, got {globs!r}")
        try:
            expanded = [glob for given in globs for glob in expand_braces(given)]
        except ValueError as error:
            raise self.error(here, str(error)) from None
        out: list[str] = []
        for glob in expanded:
            out.append(glob)
            fused = re.match(r"(.*(?<!\w)experts)\.", glob)  # not shared_experts: ordinary Linears in slimc too
            if fused and fused.group(1) not in out:
                out.append(fused.group(1))
                self.note(here, f"glob {glob!r} also given as {fused.group(1)!r}: slimc quantizes fused MoE experts "
                                "as one module (gate_up and down together, one scheme)")
        return list(dict.fromkeys(out))

    # --- smoothing and rotation -------------------------------------------------------------------------

    def smoothing(self, step: dict, here: str, kind: str) -> None:
        if self.smooth is not None:
            self.note(here, f"merged into the smooth step of {self.smooth_at}: slimc smooths each group once")
        smooth = self.smooth or {"pass": "smooth"}
        # flex_* search where alpha is not given (flex_smooth_quant: alpha or beta); awq always searches its scales
        searched = SMOOTHERS[kind] is None and (step.get("alpha") is None or kind == "flex_smooth_quant" and
                                                step.get("beta") is None)
        if searched:
            smooth["search"] = True
            extra = "flex_smooth_quant's beta has no equivalent" if kind == "flex_smooth_quant" else \
                f"{kind}'s own search and its qconfig are not used"
            self.note(here, f"mapped to smooth with search: true (slimc searches alpha per group for the lowest "
                            f"quantized block error; {extra})")
        elif "alpha" not in smooth:
            smooth["alpha"] = step.get("alpha", SMOOTHERS[kind])
            beta = 0 if kind == "flex_awq_ssz" else step.get("beta")  # flex_awq_ssz always uses beta 0
            if beta is not None and abs(smooth["alpha"] + beta - 1.0) > 1e-9:
                self.note(here, f"beta {beta}: slimc raises the weights to 1 - alpha")
        subgraphs = step.get("enable_subgraph_type", ["norm-linear"] if kind == "smooth_quant" else None)
        if subgraphs is not None:  # None: slimc's default list, which has every msModelSlim one it knows
            for other in (t for t in subgraphs if t not in SUBGRAPHS):
                self.note(here, f"enable_subgraph_type {other!r}: no such slimc smooth subgraph; not smoothed")
            merged = smooth.get("subgraphs", []) + [SUBGRAPHS[t] for t in subgraphs if t in SUBGRAPHS]
            smooth["subgraphs"] = list(dict.fromkeys(merged))
        if step.get("include") not in (None, ["*"]) or step.get("exclude"):
            self.note(here, "include / exclude not converted: slimc's smooth treats every group of its subgraphs")
        if step.get("scale_min", 1e-5) != 1e-5:
            self.note(here, f"scale_min {step['scale_min']}: slimc clamps smoothing scales to [1e-5, 1e5]")
        if step.get("symmetric") is False:
            self.note(here, "symmetric: false (an activation shift as well as a scale): slimc migrates scales only")
        self.smooth, self.smooth_at = smooth, self.smooth_at or here.split(" ")[0]

    def rotate(self, step: dict, here: str, kind: str) -> None:
        if kind == "adapt_rotation":
            self.note(here, "mapped to norm_fusion + rotate: a fixed randomised Hadamard, not a learned rotation")
        online = bool(step.get("online", False))
        self.rotation = [{"pass": "norm_fusion"}, {"pass": "rotate", "seed": 0, "online_down": online}]
        if online:
            self.note(here, "online: true: slimc rotates down_proj inputs online; msModelSlim's online o_proj "
                            "rotation becomes slimc's offline per-head rotation (rotate heads: true)")
        for key in ("block_size", "max_tp_size", "down_proj_online_layers"):
            if step.get(key, -1) not in (-1, []):
                self.note(here, f"{key} {step[key]!r}: no rotate option; slimc rotates with full-width Hadamards")

    # --- the rest of spec, and the result ----------------------------------------------------------------

    def other_spec(self, spec: dict, api: str) -> None:
        if "dataset" in spec or api != "multimodal_sd_modelslim_v1":  # diffusion: msModelSlim samples one prompt
            self.note("spec.dataset", f"{spec.get('dataset', 'mix_calib.jsonl')!r}: msModelSlim's lab_calib files do not "
                                      f"ship with slimc; calibration.dataset {CALIBRATION[api]['dataset']} (or your "
                                      "own file, docs/config.md)")
        for i, stage in enumerate(spec.get("prior") or []):
            for j, step in enumerate(stage.get("process") or [] if isinstance(stage, dict) else []):
                kind = step.get("type") if isinstance(step, dict) else None
                self.note(f"spec.prior[{i}].process[{j}] (type: {kind})", "not converted: slimc has no prior stages; "
                                                                         "rotate uses a fixed Hadamard, nothing is learned")
        if "default_text" in spec:
            self.note("spec.default_text", "not converted: builtin:image-text pairs every image with its own text")
        if "multimodal_sd_config" in spec:
            self.note("spec.multimodal_sd_config", "not converted: slimc runs the pipeline on builtin:prompts; set "
                                                   "calibration.diffusion (steps, height, width, frames) for the sampling")
        if "runner" in spec:
            self.note(f"spec.runner ({spec['runner']})", "ignored: slimc always processes the model block by block")
        for key in sorted(set(spec) - set(SPEC_KEYS)):
            self.note(f"spec.{key}", "not converted: not a msModelSlim V1 spec key this converter knows")

    def export(self, saves: Any) -> list[dict]:
        """spec.save as slimc export formats; part_file_size (GiB; 0: one file) as max_shard_size."""
        if not saves:
            self.note("spec.save", "none given (msModelSlim would write nothing); export format mindie")
            return [{"format": "mindie"}]
        export: list[dict] = []
        for i, save in enumerate(saves):
            kind = save.get("type") if isinstance(save, dict) else None
            here, fmt = f"spec.save[{i}] (type: {kind})", SAVERS.get(kind)
            if fmt is None or any(entry["format"] == fmt for entry in export):
                self.note(here, f"not converted: {'format ' + fmt + ' is already written' if fmt else 'no slimc format'}"
                                "; slimc writes mindie (ascendV1) and vllm (compressed-tensors)")
                continue
            if kind == "mindie_format_saver":
                self.note(here, "format mindie writes the ascendV1 layout (quant_model_weights.safetensors and its "
                                "description), not mindie_format_saver's MindIE-SD layout; check your runtime loads it")
            size = save.get("part_file_size", 4)
            export.append({"format": fmt} | ({"max_shard_size": f"{size}GiB"} if size else {}))
        return export

    def config(self, api: str, export: list[dict]) -> dict:
        calibrate: dict[str, Any] = {"pass": "calibrate"}
        asked = [(here, algorithm) for here, algorithm in self.weight_algorithms.items() if algorithm != "rtn"]
        if asked:
            first, algorithm = asked[0]
            calibrate |= {"weight_algorithm": algorithm, algorithm: self.gptq if algorithm == "gptq" else self.autoround}
            name = {"gptq": "GPTQ", "autoround": "AutoRound"}[algorithm]
            for here in (h for h, other in self.weight_algorithms.items() if other != algorithm):
                self.note(here, f"weights rounded by {name} as well: calibrate's weight_algorithm is one for all layers "
                                f"and {first} asks for {name}")
        fake_quant = {"pass": "fake_quant", "rules": self.rules[::-1]} | ({"kv_cache": self.kv_cache} if self.kv_cache else {})
        steps = [*self.rotation, self.smooth, self.rotate_inputs, fake_quant, calibrate, {"pass": "lower"}]
        return {
            "version": CONFIG_VERSION,
            "model": {"family": "auto", "dtype": "auto"},
            "calibration": dict(CALIBRATION[api]),
            "schemes": self.schemes,
            "pipeline": [step for step in steps if step is not None],
            "export": export,
        }
