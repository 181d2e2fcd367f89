"""Import pretrained OpenAI CLIP / open_clip ViT checkpoints into qtx params.

  sd = load_state_dict("ViT-B-16.pt")          # {name: float32 numpy array}
  arch = infer_config(sd)                      # architecture read from the shapes
  set_model_config(config, arch)               # or: config_overrides(arch) for the CLI
  params = convert(sd, config)                 # qtx param tree (nested dicts of numpy)
  params = load_into(path, template, config)   # what `config.init_from=<file>` runs

Files: .pt / .pth / .bin (PyTorch; torch is needed only here: `pip install qtx[torch]`),
loaded with `torch.load(weights_only=True)`, which runs no code from the file. OpenAI's original
releases are TorchScript archives: opening one with `torch.jit.load` runs code stored in it, so
qtx refuses them unless asked explicitly (`allow_torchscript=True`; on the command line
`python -m qtx.weights ViT-B-16.pt --allow_torchscript --save ViT-B-16.safetensors` converts
once, and training then reads the .safetensors file). .safetensors files need no torch (the `safetensors` package, or the
small reader here when it is missing). Training checkpoints that wrap the weights
({'state_dict': ...}, 'module.' prefixes) are unwrapped.

Name mapping (torch Linear weights are (out, in); qtx kernels are (in, out), so transposed):

  visual.conv1.weight (W, C, P, P)      -> visual/patch_embed/kernel (P*P*C, W), rows in the
                                           (row, col, channel) order of `vit.patchify`
  visual.class_embedding                -> visual/cls_token
  visual.positional_embedding           -> visual/pos_embed
  visual.ln_pre / ln_post               -> visual/ln_pre / ln_post  {scale, bias}
  visual.proj (W, E)                    -> visual/proj/kernel
  token_embedding.weight                -> textual/token_embed
  positional_embedding                  -> textual/pos_embed
  ln_final                              -> textual/ln_final
  text_projection (W, E)                -> textual/proj/kernel
  logit_scale (, logit_bias)            -> logit_scale (, logit_bias)
  <tower>.transformer.resblocks.N.      -> <tower>/encoder/block_N/  (or the stacked
                                           encoder/blocks/block/ with model.scan)
    ln_1, ln_2                          -> ln_1, ln_2
    attn.in_proj_weight (3D, D) / bias  -> attn/{query,key,value}/{kernel (D, D), bias}
    attn.out_proj                       -> attn/out
    mlp.c_fc, mlp.c_proj                -> mlp/fc1, mlp/fc2

Parameters the checkpoint does not have keep their fresh initialisation: `logit_bias`
(SigLIP loss) and the gates of gated attention. Gates (`gate_init`):

  'preserve' (default)  gate output kernel = 0 and bias = logit(pi_init), so every gate starts
                        at exactly pi_init for every token, and the attention output projection
                        is divided by pi_init, so the imported model computes exactly the
                        checkpoint's function at step 0. A gate of pi_init without the
                        compensation would scale every head's output by pi_init (halve it for
                        the ViT default 0.5) and fine-tuning would first have to undo that
                        damage. The gate bias starts where Bondarenko et al. (2023) initialise
                        it, in the sigmoid's steep region, so heads can learn to close (no-op)
                        quickly; an opened gate (up to 1) then amplifies a head by at most
                        1 / pi_init.
  'fresh'               keep the gates' fresh initialisation (random kernel, bias
                        logit(pi_init)) and the checkpoint's projection: the from-scratch
                        recipe; the imported model starts away from the checkpoint.

Activations: shapes cannot tell QuickGELU from GELU. OpenAI's releases (TorchScript archives, or
state_dicts that keep their metadata scalars input_resolution / context_length / vocab_size)
are recognised and use QuickGELU (`checkpoint_activation`); for any other checkpoint the
activation must be given (`python -m qtx.weights CKPT --activation gelu`, most open_clip
models). `load_into` warns when the model's activation differs from the recognised one, or
when it cannot be confirmed and is the default (tanh-approximate GELU, which no public CLIP
checkpoint uses).
"""
from __future__ import annotations

from qtx.weights.cli import main
from qtx.weights.convert import (activation_warnings, config_overrides, convert, convert_block,
                                 infer_config, init_gates, load_into, merge_into_template,
                                 patch_kernel, set_model_config)
from qtx.weights.files import (DEFAULT_HEAD_DIM, GATE_INIT_MODES, SAFETENSORS_SUFFIX,
                               TORCH_SUFFIXES, checkpoint_activation, is_torchscript,
                               load_state_dict, open_clip_model_class, read_safetensors,
                               write_safetensors)

__all__ = ["main", "activation_warnings", "config_overrides", "convert", "convert_block",
           "infer_config", "init_gates", "load_into", "merge_into_template", "patch_kernel",
           "set_model_config", "DEFAULT_HEAD_DIM", "GATE_INIT_MODES", "SAFETENSORS_SUFFIX",
           "TORCH_SUFFIXES", "checkpoint_activation", "is_torchscript", "load_state_dict",
           "open_clip_model_class", "read_safetensors", "write_safetensors"]
