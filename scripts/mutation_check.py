"""Mutation check: do the tests fail when the code is wrong?

Each mutant below is a small, named change to a core formula or a piece of wiring. For every
mutant the script copies the tracked files of this checkout into a temporary directory, applies
the change there (never to the checkout), and runs the mutant's tests from the suite's fast
subset (the test files that cover the mutated code, stopping at the first failure) with that
copy first on PYTHONPATH. A mutant is *caught* when a test fails; one that survives is a missing
test. The result is a markdown table: mutant, what it changes, the first test that failed.

  python scripts/mutation_check.py --out docs/mutation.md      # all mutants (~15 min, 2 cores)
  python scripts/mutation_check.py --only gate_ignored,fq_floor
  python scripts/mutation_check.py --list
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass(frozen=True)
class Mutant:
  name: str
  what: str
  path: str
  edits: tuple[tuple[str, str], ...]  # (old, new); each old must occur exactly once
  tests: tuple[str, ...]


def M(name, what, path, old, new, *tests, more=()):
  return Mutant(name, what, path, ((old, new),) + tuple(more), tuple(tests))


_CTX_QUANT = ('    ctx_BxTxHxK = ActQuant(cfg=self.quant, point="attn_context", name="context_quant")(\n'
              '        ctx_BxTxHxK, None if valid_BxT is None else valid_BxT[:, :, None, None])\n')

MUTANTS = (
    # normalizers
    M("softmax_denominator", "softmax divides by sum + 1e-3",
      "qtx/nn/normalizers/softmax.py",
      "y = e / jnp.where(s > 0, s, 1.0)", "y = e / jnp.where(s > 0, s + 1e-3, 1.0)",
      "tests/test_normalizers.py"),
    M("clipped_stretch", "clipped softmax stretches by zeta + gamma", "qtx/nn/normalizers/clipped_softmax.py",
      "y = jnp.clip((zeta - gamma) * s + gamma, 0.0, 1.0)",
      "y = jnp.clip((zeta + gamma) * s + gamma, 0.0, 1.0)", "tests/test_normalizers.py"),
    M("clipped_lower_bound", "clipped softmax clips at -1 instead of 0", "qtx/nn/normalizers/clipped_softmax.py",
      "y = jnp.clip((zeta - gamma) * s + gamma, 0.0, 1.0)",
      "y = jnp.clip((zeta - gamma) * s + gamma, -1.0, 1.0)", "tests/test_normalizers.py"),
    M("gamma_all_keys", "gamma = -alpha / T for every row, not -alpha / N_i",
      "qtx/nn/normalizers/clipped_softmax.py",
      "g = -alpha / jnp.maximum(jnp.asarray(n, jnp.float32), 1.0)", "g = -alpha / x.shape[-1]",
      "tests/test_attention_reference.py", "tests/test_normalizers.py"),
    M("causal_row_counts", "every causal row 'sees' all keys (N_i = T)", "qtx/nn/attention.py",
      "  if causal:\n    n = jnp.minimum(", "  if False:\n    n = jnp.minimum(",
      "tests/test_attention_reference.py"),
    M("softplus_no_qk_norm", "softplus attention without q/k L2 normalisation",
      "qtx/nn/attention.py", "    if norm.normalize_qk:", "    if False:",
      "tests/test_attention_reference.py"),
    M("softplus_no_log_n", "softplus score scale log(d) log(2) instead of log(d) log(N_i)",
      "qtx/nn/normalizers/softplus.py",
      "return math.log(d) * jnp.log(jnp.maximum(jnp.asarray(n, jnp.float32), 2.0))",
      "return math.log(d) * math.log(2.0)", "tests/test_attention_reference.py"),
    M("softplus_offset", "re-weighting offset O = 0.5 instead of 1",
      "qtx/nn/normalizers/softplus.py",
      "r = n * a - jnp.where(n <= first_row_keys, 0.0, 1.0)",
      "r = n * a - jnp.where(n <= first_row_keys, 0.0, 0.5)", "tests/test_normalizers.py"),
    M("softplus_vjp", "softplus VJP drops the normalisation term",
      "qtx/nn/normalizers/softplus.py",
      "ds = da - jnp.sum(dr * a, axis=-1, keepdims=True) * n_over_denom", "ds = da",
      "tests/test_normalizers.py"),
    M("sink_dropped", "softmax_with_sink leaves exp(sink) out of the denominator",
      "qtx/nn/normalizers/softmax_sink.py",
      "s = jnp.sum(e, axis=axis, keepdims=True) + jnp.exp(sink - m)",
      "s = jnp.sum(e, axis=axis, keepdims=True)", "tests/test_softmax_sink.py"),
    M("sink_not_learned", "the attention module ignores the learned sink logits",
      "qtx/nn/attention.py",
      "p_BxHxTxS = norm(s_BxHxTxS.astype(jnp.float32), where=where, n_keys=n_keys, **learned)",
      "p_BxHxTxS = norm(s_BxHxTxS.astype(jnp.float32), where=where, n_keys=n_keys)",
      "tests/test_softmax_sink.py"),
    # gates
    M("gate_ignored", "gated attention multiplies by 0.5 instead of the gate",
      "qtx/nn/attention.py",
      "ctx_BxTxHxK = ctx_BxTxHxK * gate_BxTxHx1_or_K.astype(ctx_BxTxHxK.dtype)",
      "ctx_BxTxHxK = ctx_BxTxHxK * 0.5", "tests/test_attention_reference.py",
      "tests/test_model.py"),
    M("gate_wrong_slice", "head i's linear gate reads another head's slice",
      "qtx/nn/attention.py",
      'logits = jnp.einsum("bthk,hk->bth", x_BxTxHxK, w) + b',
      'logits = jnp.einsum("bthk,hk->bth", x_BxTxHxK[:, :, ::-1], w) + b',
      "tests/test_attention_reference.py", "tests/test_model.py"),
    M("gate_quant_before_gate", "context quantized before the float gate (the old bias)",
      "qtx/nn/attention.py", _CTX_QUANT, "", "tests/test_quant_layers.py",
      more=(('    if cfg.gate != "none":\n      # The gate',
             _CTX_QUANT + '    if cfg.gate != "none":\n      # The gate'),)),
    # fake quant and estimators
    M("fq_zero_point_unrounded", "asymmetric zero point not rounded", "qtx/quant/fake_quant.py",
      "zero_point = jnp.clip(jnp.round(-x_min / scale), q_lo, q_hi)",
      "zero_point = jnp.clip(-x_min / scale, q_lo, q_hi)", "tests/test_fake_quant.py"),
    M("fq_floor", "quantizer floors instead of rounding", "qtx/quant/fake_quant.py",
      "return jnp.clip(jnp.round(x / grid.scale) + grid.zero_point, grid.q_lo, grid.q_hi)",
      "return jnp.clip(jnp.floor(x / grid.scale) + grid.zero_point, grid.q_lo, grid.q_hi)",
      "tests/test_fake_quant.py"),
    M("fq_symmetric_scale", "symmetric scale absmax / 128 instead of / 127",
      "qtx/quant/fake_quant.py", "scale = jnp.maximum(absmax / q_hi, tiny)",
      "scale = jnp.maximum(absmax / (q_hi + 1), tiny)", "tests/test_fake_quant.py"),
    M("fq_ste_everywhere", "straight-through gradient also where the value is clipped",
      "qtx/quant/fake_quant.py", "inside = jax.lax.stop_gradient((x_c >= lo) & (x_c <= hi))",
      "inside = jnp.ones_like(x_c, bool)", "tests/test_fake_quant.py"),
    M("ema_momentum_swapped", "running min-max weights the new batch by the momentum",
      "qtx/quant/estimators.py",
      "new_min = jnp.where(first, b_min, momentum * state.x_min + (1.0 - momentum) * b_min)",
      "new_min = jnp.where(first, b_min, (1.0 - momentum) * state.x_min + momentum * b_min)",
      "tests/test_estimators.py", "tests/test_quant_layers.py"),
    M("ema_of_widened_range", "running min-max averages the zero-widened range (the old bias)",
      "qtx/quant/layers.py", "        new_min, new_max = state.x_min, state.x_max",
      "        new_min, new_max = jnp.minimum(state.x_min, 0.0), jnp.maximum(state.x_max, 0.0)",
      "tests/test_quant_layers.py"),
    M("percentile_position", "percentile position q * n instead of q * (n - 1)",
      "qtx/quant/estimators.py", "hi = order_stat_pair(q / 100.0 * (n - 1), largest=True)",
      "hi = order_stat_pair(q / 100.0 * n, largest=True)", "tests/test_estimators.py"),
    M("mse_picks_worst", "MSE range search keeps the worst candidate",
      "qtx/quant/estimators.py", "better = err < best_err", "better = err > best_err",
      "tests/test_estimators.py"),
    M("weights_never_quantized", "weights stay float under W8A8", "qtx/quant/layers.py",
      'if not is_active(cfg) or not cfg.quantizes("weights"):', "if True:",
      "tests/test_quant_layers.py"),
    # outlier statistics and PTQ quantization points
    M("kurtosis_var", "kurtosis divides by var instead of var^2", "qtx/quant/outliers.py",
      "return jnp.where(var > 0, m4 / jnp.square(safe), 0.0)",
      "return jnp.where(var > 0, m4 / safe, 0.0)", "tests/test_outliers.py"),
    M("ffn_out_after_residual", "ffn_out sown after the residual sum", "qtx/nn/transformer.py",
      'self.sow("intermediates", "ffn_out", y)',
      'self.sow("intermediates", "ffn_out", x_BxTxD + y)', "tests/test_clip_reference.py"),
    M("block_out_is_ffn", "block_out sown as the FFN output", "qtx/nn/transformer.py",
      'self.sow("intermediates", "block_out", x_BxTxD)',
      'self.sow("intermediates", "block_out", y)', "tests/test_clip_reference.py"),
    M("text_padding_counted", "text padding counted in statistics and calibration",
      "qtx/nn/text.py", "  return jnp.arange(tokens_BxT.shape[1])[None, :] <= eot_B[:, None]",
      "  return jnp.ones(tokens_BxT.shape, bool)", "tests/test_ptq.py",
      "tests/test_clip_reference.py"),
    M("resid_quant_dropped", "first residual sum not quantized", "qtx/nn/transformer.py",
      'x_BxTxD = ActQuant(cfg=self.quant, point="resid", name="resid_1_quant")(x_BxTxD + y, v)',
      "x_BxTxD = x_BxTxD + y", "tests/test_ptq.py"),
    M("mlp_act_quant_dropped", "MLP activation not quantized before fc2", "qtx/nn/transformer.py",
      'h = ActQuant(cfg=self.quant, point="mlp_act", name="act_quant")(h, valid_BxTx1)',
      "h = h", "tests/test_ptq.py"),
    # losses
    M("clip_loss_rows_twice", "CLIP loss averages image->text twice", "qtx/losses.py",
      "  t2i = jnp.mean(_lse(l_BxB, 0, impl) - diag)",
      "  t2i = jnp.mean(_lse(l_BxB, 1, impl) - diag)", "tests/test_losses.py"),
    M("siglip_no_labels", "SigLIP loss ignores the -1 labels", "qtx/losses.py",
      "return -jnp.sum(jax.nn.log_sigmoid(labels * l_BxB)) / B",
      "return -jnp.sum(jax.nn.log_sigmoid(l_BxB)) / B", "tests/test_losses.py"),
    M("ring_grad_diagonal", "ring loss backward subtracts the positives once, not twice",
      "qtx/sharded_losses.py", "    g_bxb = g_bxb - 2.0 * jnp.eye(b, dtype=jnp.float32)",
      "    g_bxb = g_bxb - 1.0 * jnp.eye(b, dtype=jnp.float32)", "tests/test_sharded_losses.py"),
    M("ring_no_rotation", "ring passes the text block to itself", "qtx/sharded_losses.py",
      "return [(j, (j - 1) % n) for j in range(n)]", "return [(j, j) for j in range(n)]",
      "tests/test_sharded_losses.py"),
    # Pallas kernels
    M("kernel_softmax_fwd", "two-pass softmax scales 1 / v by 0.99", "qtx/kernels/softmax.py",
      "inv_v = jnp.where(v > 0, 1.0 / jnp.where(v > 0, v, 1.0), 0.0)",
      "inv_v = jnp.where(v > 0, 0.99 / jnp.where(v > 0, v, 1.0), 0.0)",
      "tests/test_kernels_softmax.py"),
    M("kernel_softmax_bwd", "two-pass softmax backward drops the <g, y> term",
      "qtx/kernels/softmax.py", "store(dx_ref, idx, s * (g_eff - dot), inb, plan.masked)",
      "store(dx_ref, idx, s * g_eff, inb, plan.masked)", "tests/test_kernels_softmax.py"),
    M("kernel_attention_fwd", "two-pass attention probabilities scaled by 0.99",
      "qtx/kernels/attention.py", "return jnp.where(valid, jnp.exp2(s - lse), 0.0)",
      "return jnp.where(valid, 0.99 * jnp.exp2(s - lse), 0.0)",
      "tests/test_kernels_attention.py"),
    M("kernel_attention_bwd_dv", "two-pass attention dV halved", "qtx/kernels/attention.py",
      "dv = dv + _dot_tn(a.astype(do.dtype), do)",
      "dv = dv + 0.5 * _dot_tn(a.astype(do.dtype), do)", "tests/test_pallas_model.py",
      "tests/test_kernels_attention.py"),
    # evaluation protocols, data sources, config and CLI guards
    M("retrieval_first_caption", "image->text scores only an image's first caption",
      "qtx/evaluate.py", "    best_j = np.argmax(masked, axis=1)",
      "    best_j = np.argmax(own, axis=1)", "tests/test_evaluators.py"),
    M("zeroshot_block_labels", "block-wise zero-shot reads the first block's labels",
      "qtx/evaluate.py", "    y = labels_N[s:s + block]", "    y = labels_N[:len(scores)]",
      "tests/test_evaluators.py"),
    M("wds_truncated_kept", "a truncated tar member is indexed", "qtx/data/webdataset.py",
      "if file_size is not None and m.offset_data + m.size > file_size:", "if False:",
      "tests/test_webdataset.py"),
    M("wds_eval_overlaps_train", "the held-out eval samples are also trained on",
      "qtx/data/webdataset.py", "entries = [e for e, ev in zip(entries, is_eval) if ev == want_eval]",
      "entries = [e for e, ev in zip(entries, is_eval) if ev or not want_eval]",
      "tests/test_webdataset.py"),
    M("crop_scale_ignored", "random resized crop ignores data.augment_scale",
      "qtx/data/augment.py", "    target = area * rng.uniform(scale[0], scale[1])",
      "    target = area * rng.uniform(0.9, 1.0)", "tests/test_webdataset.py"),
    M("imagefolder_unsorted_wnids", "WordNet-id folders taken in reverse order",
      "qtx/data/imagefolder.py", "    folders = sorted(d for d in os.listdir(root)",
      "    folders = sorted((d for d in os.listdir(root)", "tests/test_imagefolder.py",
      more=(("                     if os.path.isdir(os.path.join(root, d)) and not d.startswith(\".\"))",
             "                     if os.path.isdir(os.path.join(root, d)) and not d.startswith(\".\")), reverse=True)"),)),
    M("multi_caption_dropped", "eval sets keep one caption per image", "qtx/data/pipeline.py",
      '  caps = [list(r.get("captions") or [r["caption"]]) for r in recs]',
      '  caps = [[r["caption"]] for r in recs]', "tests/test_webdataset.py"),
    M("keep_float_accepts_anything", "quant.keep_float accepts names nothing reads",
      "qtx/quant/layers.py", "    check_keep_float(self.keep_float)", "    pass",
      "tests/test_quant_layers.py"),
    M("adam_moments_replicated", "Adam's moments built without the parameters' axis names",
      "qtx/run.py", "opt_state=tx.init(params))", "opt_state=tx.init(nn.meta.unbox(params)))",
      "tests/test_parallel.py"),
    M("param_error_unprefixed", "attention errors lose their key path", "qtx/nn/clip.py",
      'raise ValueError(f"model.{tower}.attention.{e.key}: {e.message}") from None',
      'raise ValueError(f"model.{tower}.attention: {e.message}") from None',
      "tests/test_train.py"),
    M("pod_allows_synthetic", "pod presets train on the embedded shapes", "qtx/config_lib.py",
      '  if c.data.name == "synthetic" and not c.data.allow_synthetic and c.mode != "compile":',
      "  if False:", "tests/test_model.py"),
    M("resume_order_unchecked", "a resume may change the data order", "qtx/modes/train.py",
      '  order = [k for k in diff if k in DATA_ORDER_KEYS or k.startswith("model.")]',
      "  order = []", "tests/test_cli.py"),
    M("torchscript_unrefused", "TorchScript archives are opened without the opt-in",
      "qtx/weights/files.py", "  if is_torchscript(path) and not allow_torchscript:", "  if False:",
      "tests/test_weights.py"),
    M("openai_not_recognised", "OpenAI's metadata keys are not read as QuickGELU",
      "qtx/weights/files.py", "  if any(k in state_dict for k in _OPENAI_MARKERS):", "  if False:",
      "tests/test_weights.py"),
    M("masked_percentile_far_end", "masked percentile positions counted from the far end",
      "qtx/quant/estimators.py", "  pos = jnp.float32(tail) * last.astype(jnp.float32)",
      "  pos = jnp.float32(1.0 - tail) * last.astype(jnp.float32)", "tests/test_estimators.py"),
    # tokenizer and weight import
    M("tokenizer_no_lowercase", "captions not lower-cased", "qtx/data/tokenizer.py",
      'return " ".join(text.split()).lower()', 'return " ".join(text.split())',
      "tests/test_tokenizer.py"),
    M("tokenizer_worst_merge", "BPE merges the highest-ranked pair first",
      "qtx/data/tokenizer.py", "if rank is not None and (best_rank is None or rank < best_rank):",
      "if rank is not None and (best_rank is None or rank > best_rank):",
      "tests/test_tokenizer.py"),
    M("weights_qk_swapped", "in_proj split as key, query, value",
      "qtx/weights/convert.py",
      'for i, name in enumerate(("query", "key", "value"))}',
      'for i, name in enumerate(("key", "query", "value"))}', "tests/test_clip_reference.py"),
    M("weights_patch_order", "conv1 kernel flattened in (col, row, channel) order",
      "qtx/weights/convert.py", "conv_WxCxPxP.transpose(2, 3, 1, 0)", "conv_WxCxPxP.transpose(3, 2, 1, 0)",
      "tests/test_clip_reference.py"),
    # remedies
    M("elementwise_gate_channels", "the elementwise gate's channels land on the wrong heads",
      "qtx/nn/attention.py", "logits = (x @ w + b).reshape(B, T, H, K)",
      "logits = (x @ w + b).reshape(B, T, K, H).swapaxes(2, 3)",
      "tests/test_attention_reference.py", "tests/test_remedies.py"),
    M("registers_get_positions", "register tokens get the first positional embeddings",
      "qtx/nn/vit.py", "(B, self.registers, self.width))], axis=1)",
      "(B, self.registers, self.width))], axis=1)\n"
      "      x = x.at[:, -self.registers:].add(pos[1:self.registers + 1].astype(x.dtype))",
      "tests/test_remedies.py"),
    M("muon_rms_scale", "Muon's updates scaled to RMS 0.25 instead of AdamW's 0.2",
      "qtx/optim.py", "MUON_RMS = 0.2", "MUON_RMS = 0.25", "tests/test_remedies.py"),
    M("muon_scan_layers_mixed", "under scan Muon orthogonalises all layers as one matrix",
      "qtx/optim.py", "MuonDimensionNumbers(1, 2) if scan",
      "MuonDimensionNumbers((0, 1), 2) if scan", "tests/test_remedies.py"),
    M("muon_on_embeddings", "Muon also updates the patch embedding and the projections",
      "qtx/optim.py", 'if not names or names[-1] != "kernel" or "encoder" not in names or "gate" in names:',
      'if not names or names[-1] != "kernel" or "gate" in names:', "tests/test_remedies.py"),
    # kernels
    M("kernel_sink_grad_sign", "the sink kernel's gradient has the wrong sign",
      "qtx/kernels/attention.py", "_sm.store(dsink_ref, _FULL, -p_sink * delta, q_ok, plan.masked)",
      "_sm.store(dsink_ref, _FULL, p_sink * delta, q_ok, plan.masked)",
      "tests/test_kernels_sink.py"),
    M("kernel_sink_dropped", "the sink kernel leaves exp(b) out of the normaliser",
      "qtx/kernels/attention.py", "init = (b2, jnp.where(b2 == -jnp.inf, 0.0, 1.0))",
      "init = (b2, jnp.zeros_like(b2))", "tests/test_kernels_sink.py"),
    M("kernel_softplus_E_dropped", "the softplus kernel's backward drops the normalisation term E",
      "qtx/kernels/attention.py", "  E = _loop(n_kb, pass_e, jnp.zeros((bq, 1), jnp.float32))",
      "  E = 0.0 * _loop(n_kb, pass_e, jnp.zeros((bq, 1), jnp.float32))",
      "tests/test_kernels_softplus.py"),
    M("kernels_replicated_on_mesh", "the kernels ignore the mesh (every device runs everything)",
      "qtx/kernels/sharding.py",
      "  if not batch_axes and not head_axes and (mesh is None or _free_size(mesh) <= 1):\n"
      "    return fn(*args)",
      "  return fn(*args)", "tests/test_kernels_sharded.py"),
    M("kernels_ignore_operand_mesh", "under a plain jit the kernels ignore the operands' mesh",
      "qtx/kernels/sharding.py", "  mesh = context_mesh() or target_lib.operand_mesh(*args)",
      "  mesh = context_mesh()", "tests/test_aot.py"),
    M("kernel_cost_estimate_dropped", "the attention kernels carry no cost estimate",
      "qtx/kernels/attention.py",
      "      cost_estimate=cost_estimate(st, name, B, H, args, out_shape, clip),",
      "      cost_estimate=None,", "tests/test_aot.py"),
    # compile mode
    M("hlo_loop_counted_once", "a while loop's body counts once, whatever its trip count",
      "qtx/aot/hlo.py",
      "          factor = (ins.trip_count or 1) if (ins.opcode == \"while\" and c == ins.body) else 1",
      "          factor = 1", "tests/test_aot.py"),
    M("fit_ignores_headroom", "a program fits whatever the headroom", "qtx/aot/report.py",
      "    rec[\"fits\"] = rec[\"used_bytes\"] <= budget", "    rec[\"fits\"] = True",
      "tests/test_aot.py"),
    # analysis
    M("attention_mass_padding", "the text tower's attention mass counts the padding rows",
      "qtx/analysis/attention_mass.py",
      'rows = valid_tokens(x) if tower == "text" else jnp.ones((B, T), bool)',
      "rows = jnp.ones((B, T), bool)", "tests/test_attention_mass.py"),
    M("backcopy_copies_the_trigger", "after a trigger the task copies the trigger itself",
      "qtx/data/bigram_backcopy.py", "x[:, t + 1] = np.where(is_trigger[x[:, t]], x[:, t - 1], drawn)",
      "x[:, t + 1] = np.where(is_trigger[x[:, t]], x[:, t], drawn)", "tests/test_backcopy.py"),
    M("w4a8_is_w8a8", "the named setting w4a8 quantizes weights to 8 bits",
      "qtx/quant/settings.py", '"w4a8": dict(weight_bits=4,', '"w4a8": dict(weight_bits=8,',
      "tests/test_ptq.py"),
    M("prob_grid_full_step", "probabilities below a full 8-bit step (1/255), not half, count as erased",
      "qtx/analysis/attention_mass.py", "TINY_PROB = 1.0 / 510.0", "TINY_PROB = 1.0 / 255.0",
      "tests/test_attention_mass.py"),
    M("filler_counts_as_content", "content queries include the filler tokens",
      "qtx/analysis/attention_mass.py",
      '"content": rows & ~is_filler & after_start', '"content": rows & after_start',
      "tests/test_attention_mass.py"),
    # data, sweep
    M("worker_skips_dropped", "bad records found in grain worker processes never reach data/skipped",
      "qtx/data/pipeline.py", "    ds = ds.map(sources.absorb_skips)",
      "    ds = ds.map(lambda b: {k: v for k, v in b.items() if k != sources.SKIP_FIELD})",
      "tests/test_webdataset.py"),
    M("resume_ignores_changed_shards", "a resume does not compare the training data's index",
      "qtx/modes/train.py", '    if old.get("fingerprint") != fp:', "    if False:",
      "tests/test_webdataset.py"),
    M("data_index_read_on_process_0_only", "only process 0 reads the saved data index on resume",
      "qtx/modes/train.py",
      "  old = json.loads(path.read_text()) if resuming and path.exists() else None",
      "  old = (json.loads(path.read_text()) if resuming and path.exists()\n"
      "         and jax.process_index() == 0 else None)",
      "tests/test_multiprocess.py"),
    M("layernorm_backward_mean_dropped",
      "LayerNorm's written-out backward drops the xhat * mean(g * xhat) term's row mean",
      "qtx/quant/layers.py",
      "- xhat * jnp.mean(g * xhat, axis=-1, keepdims=True))", "- xhat * g)",
      "tests/test_quant_layers.py"),
    M("score_scale_on_wrong_q_axis", "the score scale moved onto q without swapping the head "
      "and query axes", "qtx/nn/attention.py",
      "  return jnp.swapaxes(s, 1, 2)", "  return s", "tests/test_attention_reference.py"),
    M("sweep_row_settings_ignored", "a sweep row's @KEY=VALUE settings are not applied",
      "qtx/modes/sweep.py", "      config_lib.override(c, o)", "      pass", "tests/test_sweep.py"),
    M("sweep_reuses_other_settings", "a finished run is reused whatever settings made it",
      "qtx/modes/sweep.py", "      if changed:\n        raise ValueError(",
      "      if False:\n        raise ValueError(", "tests/test_sweep.py"),

)


def check_snippets(root: str = ROOT) -> list[str]:
  """Problems with the mutants against the code at `root` (empty when every edit applies)."""
  problems = []
  names = [m.name for m in MUTANTS]
  if len(set(names)) != len(names):
    problems.append("duplicate mutant names")
  for m in MUTANTS:
    text = open(os.path.join(root, m.path)).read()
    for old, new in m.edits:
      n = text.count(old)
      if n != 1:
        problems.append(f"{m.name}: {old[:60]!r} occurs {n} times in {m.path}")
      text = text.replace(old, new)
    for t in m.tests:
      if not os.path.exists(os.path.join(root, t)):
        problems.append(f"{m.name}: no test file {t}")
  return problems


def _tracked_files(root: str) -> list[str]:
  out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=root, check=True,
                       capture_output=True, text=True).stdout
  return [p for p in out.splitlines() if p and not p.startswith(("runs/", "docs/figures/"))
          and os.path.isfile(os.path.join(root, p))]


def _copy_tree(root: str, dest: str) -> None:
  for p in _tracked_files(root):
    os.makedirs(os.path.dirname(os.path.join(dest, p)) or dest, exist_ok=True)
    shutil.copy2(os.path.join(root, p), os.path.join(dest, p))


def run_mutant(m: Mutant, copy: str, timeout: int) -> tuple[str, float]:
  """('caught by <test>' | 'SURVIVED' | 'timeout', seconds) of one mutant in the copy."""
  path = os.path.join(copy, m.path)
  original = open(path).read()
  text = original
  for old, new in m.edits:
    if text.count(old) != 1:
      raise ValueError(f"mutant {m.name}: snippet does not occur exactly once in {m.path}")
    text = text.replace(old, new)
  env = dict(os.environ, PYTHONPATH=copy + os.pathsep + os.environ.get("PYTHONPATH", ""),
             PYTHONDONTWRITEBYTECODE="1")
  t0 = time.perf_counter()
  try:
    with open(path, "w") as f:
      f.write(text)
    r = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
                        "-p", "no:randomly", *m.tests], cwd=copy, env=env, capture_output=True,
                       text=True, timeout=timeout)
    out = r.stdout + r.stderr
    if r.returncode == 0:
      verdict = "SURVIVED"
    else:
      failed = re.findall(r"^(?:FAILED|ERROR) (.+?)(?: - .*)?$", out, re.M)
      verdict = f"caught by `{failed[0]}`" if failed else f"caught (pytest exit {r.returncode})"
  except subprocess.TimeoutExpired:
    verdict = "timeout"
  finally:
    with open(path, "w") as f:
      f.write(original)
  return verdict, time.perf_counter() - t0


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--only", default="", help="comma-separated mutant names")
  p.add_argument("--out", default=None, help="markdown file for the table")
  p.add_argument("--timeout", type=int, default=900, help="seconds per mutant")
  p.add_argument("--list", action="store_true", help="print the mutants and exit")
  args = p.parse_args(argv)
  problems = check_snippets()
  if problems:
    print("mutants out of date with the code:\n  " + "\n  ".join(problems), file=sys.stderr)
    return 2
  chosen = [m for m in MUTANTS if not args.only or m.name in args.only.split(",")]
  if args.list:
    for m in chosen:
      print(f"{m.name:26s} {m.path:28s} {m.what}")
    return 0
  rows, survived = [], 0
  with tempfile.TemporaryDirectory(prefix="qtx_mutants_") as copy:
    _copy_tree(ROOT, copy)
    for i, m in enumerate(chosen, 1):
      verdict, sec = run_mutant(m, copy, args.timeout)
      survived += not verdict.startswith("caught")
      rows.append(f"| `{m.name}` | {m.what} (`{m.path}`) | {verdict} | {sec:.0f} |")
      print(f"[{i}/{len(chosen)}] {m.name}: {verdict} ({sec:.0f} s)", flush=True)
      if args.out:
        _write(args.out, rows, chosen, survived, done=i)
  print(f"{len(chosen) - survived} of {len(chosen)} mutants caught", flush=True)
  return 1 if survived else 0


def _write(path, rows, chosen, survived, done):
  cmd = "python scripts/mutation_check.py" + (f" --out {path}")
  with open(path, "w") as f:
    f.write("# Mutation check\n\nEach mutant is a small wrong change to a formula or to wiring, "
            "applied to a temporary copy of the code; the tests of the fast subset that cover "
            "it must fail. A surviving mutant is a missing test.\n\n"
            f"Command: `{cmd}` ({done} of {len(chosen)} run, "
            f"{done - survived} caught).\n\n| mutant | change | result | seconds |\n|---|---|---|---|\n"
            + "\n".join(rows) + "\n")


if __name__ == "__main__":
  raise SystemExit(main())
