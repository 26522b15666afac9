"""Make an OpenVINO GenAI model folder from an edgeglm int8 bundle (benchmark-only helper).

OpenVINO GenAI's `LLMPipeline` loads a folder holding `openvino_model.xml` (a stateful decoder
with inputs input_ids, attention_mask, position_ids, beam_idx and an output `logits` of shape
(batch, seq, vocab)), `openvino_tokenizer.xml` / `openvino_detokenizer.xml` and the model's
config.json / generation_config.json. The usual way to make one is optimum-intel's exporter, but
optimum-intel pins transformers below the version edgeglm's test suite runs (and pulls
torchvision), so it cannot go into the same environment. Instead this helper adapts the IR that
edgeglm itself ships in the bundle, which is the like-for-like choice anyway: the same graph and
the same int8 per-channel weights that edgeglm's OpenVINO engine runs. Two changes, neither
touching the arithmetic:

  * a `beam_idx` input (i32, one entry per batch row) that reorders every KV-cache variable
    through a Gather on its ReadValue (what GenAI's beam search sets; greedy passes 0..batch-1);
    edgeglm's IR already reads each variable through such a Gather (identity rows, for the CPU
    plugin's KV-cache attention fusion), whose indices become `beam_idx`;
  * the (batch, vocab) last-position logits get a unit seq axis: (batch, 1, vocab).

GenAI's default CPU pipeline (paged attention) runs this IR correctly (on an fp32 `tiny`
bundle its greedy tokens equal the PyTorch reference's). Its stateful backend
(ATTENTION_BACKEND="SDPA") failed on IRs before the OpenVINO graph-fusion rework (the query group
folded into the sequence axis made ScaledDotProductAttentionWithKVCache reject the mask's shape);
the current IR uses 4-D (batch, heads, seq, head_dim) attention, which that node accepts (not
benchmarked here).

The tokenizer IRs come from openvino_tokenizers.convert_tokenizer on the checkpoint's
tokenizer.json (loaded with transformers' PreTrainedTokenizerFast).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

MODEL_XML = "openvino_model.xml"


def add_beam_idx(model) -> None:
    """Route every ReadValue's output through Gather(state, beam_idx, axis 0), as GenAI expects."""
    import openvino as ov
    import openvino.opset13 as ops

    beam_idx = ops.parameter([-1], ov.Type.i32, name="beam_idx")
    beam_idx.output(0).set_names({"beam_idx"})
    for op in model.get_ops():
        if op.get_type_name() != "ReadValue":
            continue
        consumers = list(op.output(0).get_target_inputs())
        readers = [t.get_node() for t in consumers]
        if len(readers) == 1 and readers[0].get_type_name() == "Gather":  # edgeglm's identity row order
            readers[0].input(1).replace_source_output(beam_idx.output(0))
            continue
        gathered = ops.gather(op.output(0), beam_idx, ops.constant(0))
        for target in consumers:
            target.replace_source_output(gathered.output(0))
    model.add_parameters([beam_idx])


def logits_with_seq_axis(model):
    """A new model whose `logits` output is (batch, 1, vocab) instead of (batch, vocab)."""
    import openvino as ov
    import openvino.opset13 as ops

    old = model.output("logits")
    result_node = old.get_node()  # the Result
    source = result_node.input_value(0)
    source.get_tensor().set_names(set())
    unsqueezed = ops.unsqueeze(source, ops.constant(np.array([1], np.int64)))
    unsqueezed.output(0).set_names({"logits"})
    new_result = ops.result(unsqueezed)
    results = [r if r is not result_node else new_result for r in model.get_results()]
    return ov.Model(results, model.get_sinks(), model.get_parameters(), "edgeglm-genai")


def tokenizer_irs(checkpoint: Path, out: Path) -> None:
    import openvino as ov
    from openvino_tokenizers import convert_tokenizer
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_file=str(checkpoint / "tokenizer.json"))
    tok, detok = convert_tokenizer(hf, with_detokenizer=True)
    ov.save_model(tok, str(out / "openvino_tokenizer.xml"))
    ov.save_model(detok, str(out / "openvino_detokenizer.xml"))


def make_genai_folder(bundle: Path, checkpoint: Path, out: Path) -> Path:
    """Write the GenAI folder for `bundle` (int8 OpenVINO IR) to `out`, replacing it whole."""
    import openvino as ov

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model = ov.Core().read_model(str(bundle / "openvino" / MODEL_XML))
    add_beam_idx(model)
    model = logits_with_seq_axis(model)
    model.validate_nodes_and_infer_types()
    ov.save_model(model, str(tmp / MODEL_XML), compress_to_fp16=False)
    tokenizer_irs(checkpoint, tmp)
    cfg = json.loads((checkpoint / "config.json").read_text())
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    eos = cfg.get("eos_token_id")
    (tmp / "generation_config.json").write_text(json.dumps({"eos_token_id": eos, "do_sample": False}) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out
