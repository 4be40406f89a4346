"""``snapopt check apple EXPORT_DIR``: does a Core ML folder work with Apple's Swift ``StableDiffusionPipeline``?

Every rule below comes from a line of Apple's Swift sources (apple/ml-stable-diffusion,
``swift/StableDiffusion``), so a folder that passes loads and runs there:

* ``StableDiffusionPipeline+Resources.swift``: file names (``TextEncoder``, ``Unet`` or both ``UnetChunk1`` and
  ``UnetChunk2``, ``VAEDecoder``, optional ``VAEEncoder``, ``vocab.json``, ``merges.txt``);
* ``Unet.swift``: inputs ``sample``/``timestep``/``encoder_hidden_states`` by name, batch 1 or 2, the first
  output read as the noise; chunks chained by name (``ManagedMLModel.swift``);
* ``Decoder.swift``/``Encoder.swift``/``TextEncoder.swift``: first input, first output,
  ``MLShapedArray<Float32>(converting:)`` (fp32 outputs, apple/ml-stable-diffusion#253), encoder output sliced
  into 4 + 4 channels, text output ``last_hidden_state`` by name, ids sent as Float32;
* ``BPETokenizer*.swift``: merges lines of two tokens, whitespace-only split (the shipped probes re-tokenized
  with :class:`snapopt.lowering.swift_tokenizer.SwiftBPE` must give the model's ids).

``.mlpackage`` specs are read with coremltools (works on Linux); compiled ``.mlmodelc`` folders through their
``metadata.json``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from snapopt.errors import UsageError

SPEC_VERSION_IOS16 = 7  # ML programs Swift's pipeline can load (it requires iOS 16.2)


def find_resources(path: Path) -> Path:
    """The Core ML resources folder inside a run folder, an export folder, or the folder itself."""
    path = Path(path)
    if not path.is_dir():
        raise UsageError(f"EXPORT_DIR: '{path}' is not a folder")
    for cand in (path, path / "coreml", path / "exports" / "coreml"):
        if cand.is_dir() and (any(cand.glob("*.mlpackage")) or any(cand.glob("*.mlmodelc"))):
            return cand
    raise UsageError(f"EXPORT_DIR: no .mlpackage or .mlmodelc in '{path}' (nor in its coreml/ or exports/coreml/)")


def _interface_mlmodelc(folder: Path) -> dict[str, Any]:
    meta = json.loads((folder / "metadata.json").read_text())
    meta = meta[0] if isinstance(meta, list) else meta

    def desc(schema):
        out = {}
        for f in schema:
            shape = json.loads(f.get("shape", "[]")) if isinstance(f.get("shape"), str) else f.get("shape", [])
            out[f["name"]] = {"shape": [int(s) for s in shape], "dtype": str(f.get("dataType", "")).lower()}
        return out
    return {"inputs": desc(meta.get("inputSchema", [])), "outputs": desc(meta.get("outputSchema", [])),
            "specification_version": int(meta.get("specificationVersion", SPEC_VERSION_IOS16))}


def _ids_through_int16(package: Path) -> bool:
    """True when the program casts ``input_ids`` to int16 (coremltools does for iOS 17+ unless told not to)."""
    from snapopt.lowering.coreml import import_coremltools

    ct = import_coremltools()
    spec = ct.utils.load_spec(str(package))
    if not spec.HasField("mlProgram"):
        return False
    from coremltools.proto import MIL_pb2

    for fn in spec.mlProgram.functions.values():
        for block in fn.block_specializations.values():
            for op in block.operations:
                if op.type != "cast":
                    continue
                names = [b.name for b in op.inputs["x"].arguments] if "x" in op.inputs else []
                if "input_ids" in names and op.outputs and op.outputs[0].type.tensorType.dataType == MIL_pb2.INT16:
                    return True
    return False


def load_interfaces(folder: Path) -> dict[str, dict[str, Any]]:
    from snapopt.lowering.coreml import interface_of

    out: dict[str, dict[str, Any]] = {}
    for p in sorted(folder.iterdir()):
        if p.suffix not in (".mlpackage", ".mlmodelc"):
            continue
        try:
            info = interface_of(p) if p.suffix == ".mlpackage" else _interface_mlmodelc(p)
        except Exception as exc:  # a broken package is a finding, not a crash
            info = {"error": f"cannot read {p.name}: {str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}"}
        info["path"] = p
        out.setdefault(p.stem, info)
    return out


def check_apple(path: Path, components: list[str] | None = None) -> tuple[list[str], list[str]]:
    """``(problems, checks)``: each problem is one line naming the file, tensor and what Swift expects.

    ``components`` limits the required files to those exported (``snapopt export --component unet``); by default a
    complete Swift resources folder is required."""
    from snapopt.lowering.apple import ENCODER_CHANNELS, read_metadata
    from snapopt.lowering.swift_tokenizer import SwiftBPE, _trim, apply_prompt_rule, read_merges

    folder = find_resources(Path(path))
    models = load_interfaces(folder)
    problems: list[str] = []
    checks: list[str] = []

    def need(cond: bool, ok: str, bad: str) -> bool:
        (checks.append(ok) if cond else problems.append(bad))
        return cond

    for name, m in models.items():
        if "error" in m:
            problems.append(m["error"])
    models = {k: v for k, v in models.items() if "error" not in v}
    wanted = set(components) if components is not None else {"unet", "vae_decoder", "text_encoder"}
    for name, comp in (("TextEncoder", "text_encoder"), ("VAEDecoder", "vae_decoder")):
        if comp in wanted:
            need(name in models, f"{name} present", f"{name}.mlpackage/.mlmodelc missing (Swift loads {name}.mlmodelc)")
    chunks = [n for n in ("UnetChunk1", "UnetChunk2") if n in models]
    if len(chunks) == 1:
        problems.append(f"{chunks[0]} without its pair: Swift loads the chunks only when both UnetChunk1 and UnetChunk2 exist")
    unet_names = ["UnetChunk1", "UnetChunk2"] if len(chunks) == 2 else ["Unet"]
    if "unet" in wanted:
        need(all(n in models for n in unet_names), "UNet present", "Unet.mlpackage (or UnetChunk1 + UnetChunk2) missing")
    for name, m in models.items():
        need(m["specification_version"] >= SPEC_VERSION_IOS16, f"{name} spec v{m['specification_version']}",
             f"{name}: specification version {m['specification_version']} < 7 (iOS 16): Swift's pipeline needs iOS 16.2 ML programs")

    def fp32_out(name: str, out: str) -> None:
        o = models[name]["outputs"].get(out)
        if o is not None:
            need(o["dtype"] == "float32", f"{name}.{out} float32",
                 f"{name}: output '{out}' is {o['dtype']}; Swift reads it with MLShapedArray<Float32>(converting:) and needs float32 "
                 "(apple/ml-stable-diffusion#253)")

    # --- UNet -------------------------------------------------------------------------------------------
    latent = None
    context = None
    if all(n in models for n in unet_names):
        first, last = models[unet_names[0]], models[unet_names[-1]]
        ins = first["inputs"]
        if need("sample" in ins, f"{unet_names[0]} input sample", f"{unet_names[0]}: no input 'sample' (Swift reads the latent shape from it)"):
            latent = ins["sample"]["shape"]
            need(len(latent) == 4 and latent[0] in (1, 2), "UNet batch 1 or 2",
                 f"{unet_names[0]}: input 'sample' has shape {latent}; Swift feeds (1 or 2, C, h, w)")
        all_inputs = {k: v for n in unet_names for k, v in models[n]["inputs"].items()}
        for req in ("timestep", "encoder_hidden_states"):
            need(req in all_inputs, f"UNet input {req}", f"{unet_names[0]}: no input '{req}' (Swift passes it by name)")
        if "encoder_hidden_states" in all_inputs:
            context = all_inputs["encoder_hidden_states"]["shape"]
            need(len(context) == 4 and context[2] == 1, "encoder_hidden_states (B, D, 1, S)",
                 f"Unet: 'encoder_hidden_states' has shape {context}; Swift sends (B, D, 1, S)")
        if latent and "timestep" in all_inputs:
            need(all_inputs["timestep"]["shape"] == [latent[0]], "timestep (B,)",
                 f"Unet: 'timestep' has shape {all_inputs['timestep']['shape']}; Swift sends ({latent[0]},)")
        outs = list(last["outputs"])
        need(len(outs) == 1, f"{unet_names[-1]} one output",
             f"{unet_names[-1]}: {len(outs)} outputs {outs}; Swift reads the first feature name, so the noise must be the only output")
        if outs:
            fp32_out(unet_names[-1], outs[0])
            need(outs[0] == "noise_pred", "UNet output noise_pred", f"{unet_names[-1]}: output is '{outs[0]}', Apple's name is 'noise_pred'")
            if latent:
                need(last["outputs"][outs[0]]["shape"] == latent, "noise_pred shape == sample shape",
                     f"{unet_names[-1]}: output shape {last['outputs'][outs[0]]['shape']} != sample shape {latent}")
        if len(chunks) == 2:
            c1, c2 = models["UnetChunk1"], models["UnetChunk2"]
            originals = set(c1["inputs"])
            for n, spec in c2["inputs"].items():
                if n in originals:
                    continue
                src = c1["outputs"].get(n)
                if need(src is not None, f"cut tensor {n}", f"UnetChunk2: input '{n}' is neither a UnetChunk1 output nor a UNet input"):
                    need(src["shape"] == spec["shape"], f"cut tensor {n} shape",
                         f"UnetChunk2: input '{n}' has shape {spec['shape']} but UnetChunk1 outputs {src['shape']}")
    # --- VAE decoder ------------------------------------------------------------------------------------
    if "VAEDecoder" in models:
        d = models["VAEDecoder"]
        need(len(d["inputs"]) == 1, "VAEDecoder one input", f"VAEDecoder: {len(d['inputs'])} inputs; Swift feeds only the first")
        z = next(iter(d["inputs"].values()))["shape"] if d["inputs"] else None
        if latent and z is not None:
            need(z == [1, *latent[1:]], "VAEDecoder input matches the UNet latent",
                 f"VAEDecoder: input shape {z}; the UNet's latent is {[1, *latent[1:]]}")
        outs = list(d["outputs"])
        need(len(outs) == 1, "VAEDecoder one output", f"VAEDecoder: {len(outs)} outputs; Swift reads the first feature name")
        if outs:
            fp32_out("VAEDecoder", outs[0])
            img = d["outputs"][outs[0]]["shape"]
            need(len(img) == 4 and img[:2] == [1, 3], "VAEDecoder image (1, 3, H, W)",
                 f"VAEDecoder: output '{outs[0]}' has shape {img}; Swift makes an RGB CGImage from (1, 3, H, W)")
    # --- VAE encoder (optional: image-to-image) ----------------------------------------------------------
    if "VAEEncoder" in models:
        e = models["VAEEncoder"]
        need(len(e["inputs"]) == 1, "VAEEncoder one input", f"VAEEncoder: {len(e['inputs'])} inputs; Swift feeds only the first")
        outs = list(e["outputs"])
        need(len(outs) == 1, "VAEEncoder one output", f"VAEEncoder: {len(outs)} outputs; Swift reads the first feature name")
        if outs:
            fp32_out("VAEEncoder", outs[0])
            shape = e["outputs"][outs[0]]["shape"]
            need(len(shape) == 4 and shape[1] == ENCODER_CHANNELS, "VAEEncoder 8 channels (mean, logvar)",
                 f"VAEEncoder: output '{outs[0]}' has {shape[1] if len(shape) > 1 else '?'} channels; Swift slices 8 "
                 "(mean = 0..<4, logvar = 4..<8) and traps on fewer")
            if latent and len(shape) == 4:
                need(shape[2:] == latent[2:], "VAEEncoder latent size", f"VAEEncoder: output {shape} does not match the UNet latent {latent}")
    # --- text encoder ------------------------------------------------------------------------------------
    meta = read_metadata(folder)
    if "TextEncoder" in models:
        t = models["TextEncoder"]
        ids = next(iter(t["inputs"].items()), None)
        if need(ids is not None, "TextEncoder input", "TextEncoder: no input"):
            name, spec = ids
            need(spec["dtype"] == "float32", "input_ids float32",
                 f"TextEncoder: input '{name}' is {spec['dtype']}; Swift sends Float32 ids (Apple's converter declares float32)")
            need(len(spec["shape"]) == 2 and spec["shape"][0] == 1, "input_ids (1, S)",
                 f"TextEncoder: input '{name}' has shape {spec['shape']}; Swift sends (1, S)")
            if context and len(spec["shape"]) == 2:
                need(spec["shape"][1] == context[3], "text length matches the UNet",
                     f"TextEncoder: {spec['shape'][1]} tokens but the UNet's encoder_hidden_states takes {context[3]}")
        need("last_hidden_state" in t["outputs"], "TextEncoder last_hidden_state",
             "TextEncoder: no output 'last_hidden_state' (Swift reads it by name)")
        for out in ("last_hidden_state", "pooled_outputs"):
            fp32_out("TextEncoder", out)
        hs = t["outputs"].get("last_hidden_state", {}).get("shape")
        if hs and context:
            need(len(hs) == 3 and hs[2] == context[1], "hidden size matches the UNet",
                 f"TextEncoder: last_hidden_state {hs} has width {hs[-1]}, the UNet's encoder_hidden_states {context[1]}")
        vocab_size = (meta or {}).get("text_vocab_size")
        if vocab_size and vocab_size > 32768 and t["path"].suffix == ".mlpackage":
            need(not _ids_through_int16(t["path"]), "token ids not cast to int16",
                 f"TextEncoder: input_ids are cast to int16 but the vocabulary has {vocab_size} ids (wrap past 32767)")
    # --- tokenizer files ---------------------------------------------------------------------------------
    bpe = None
    if "text_encoder" in wanted and need((folder / "vocab.json").is_file() and (folder / "merges.txt").is_file(), "vocab.json + merges.txt",
            "vocab.json or merges.txt missing (Swift's BPETokenizer reads both from the resources folder)"):
        try:
            vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
            ok = isinstance(vocab, dict) and all(isinstance(k, str) and isinstance(v, int) for k, v in vocab.items())
            need(ok, "vocab.json is {token: id}", "vocab.json: not a JSON object of token -> integer id")
            merges = read_merges(folder / "merges.txt")
            checks.append(f"merges.txt parses ({len(merges)} merges)")
            if ok:
                need("<|endoftext|>" in vocab and "<|startoftext|>" in vocab, "special tokens",
                     "vocab.json: no <|startoftext|>/<|endoftext|> (Swift's start, end, pad and unknown tokens)")
                vs = (meta or {}).get("text_vocab_size")
                if vs:
                    need(max(vocab.values()) < vs, "ids < text encoder vocabulary",
                         f"vocab.json: id {max(vocab.values())} is outside the text encoder's {vs}-row embedding")
                bpe = SwiftBPE(vocab, merges)
        except ValueError as exc:
            problems.append(str(exc).splitlines()[0])
    # --- metadata and tokenization -------------------------------------------------------------------------
    if need(meta is not None, "snapopt-apple.json", "snapopt-apple.json missing: nothing records the scale, scheduler and prompt rule an app must set"):
        app = meta.get("app", {})
        from snapopt.lowering.apple import SWIFT_SCHEDULERS

        need(app.get("scheduler") in SWIFT_SCHEDULERS, "scheduler Swift has",
             f"snapopt-apple.json: scheduler '{app.get('scheduler')}' is not one of Swift's ({', '.join(SWIFT_SCHEDULERS)})")
        need(app.get("prediction_type", "epsilon") == "epsilon", "epsilon prediction",
             f"snapopt-apple.json: prediction_type '{app.get('prediction_type')}'; Swift's schedulers assume epsilon")
        tok = meta.get("tokenizer")
        if tok and bpe is not None:
            rule = tok.get("prompt_rule", "none") != "none"
            eos = bpe.vocab.get("<|endoftext|>", 0)
            bad = [e["text"] for e in tok.get("expected", [])
                   if _trim(bpe.ids(apply_prompt_rule(e["text"]) if rule else e["text"]), eos) != e["ids"]]
            need(not bad, f"tokenization of {len(tok.get('expected', []))} probe prompts" + (" (with the prompt rule)" if rule else ""),
                 f"tokenization: Swift's whitespace BPE gives other ids than the model's tokenizer for {len(bad)} probe prompts, "
                 f"e.g. {bad[0]!r}" if bad else "")
    return problems, checks
